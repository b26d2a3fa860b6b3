"""``ra bench``'s command line: the options, their checks (each one honoured or refused with a ``UserError`` naming
the valid choices), ``--render`` and ``--model`` (the whole-model benchmark, ``bench_model``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .bench import BenchConfig, fill_ratios, needs_cuda, run_bench
from .bench_arms import MODES, default_arms
from .bench_report import PASSES, committed_gpu_table, markdown_report, write_results
from .errors import UserError

GROUPS = ("core", "heads", "evolution", "kernels")
CPU_SHAPES = [(2, 64), (1, 128)]
CPU_WIDTH = (64, 4)
TIMING_OPTIONS = ("device", "groups", "shapes", "arms", "widths", "modes", "passes", "precision", "repeats",
                  "inner", "out")


def _choices(value: str, option: str, valid: tuple[str, ...]) -> list[str]:
    """A comma list whose every item is one of ``valid``; a ``UserError`` naming the option otherwise."""
    items = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in items if s not in valid]
    if bad or not items:
        raise UserError(f"{option}: unknown value(s) {', '.join(bad) or repr(value)}; valid: {', '.join(valid)}")
    return items


def _pairs(value: str, option: str, sep: str, form: str) -> list[tuple[int, int]]:
    """``"8x1024,2x4096"`` -> ``[(8, 1024), (2, 4096)]`` (positive ints), else a ``UserError`` naming ``form``."""
    out = []
    for item in (s.strip() for s in value.split(",") if s.strip()):
        parts = item.split(sep)
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"{option}: expected {form} (positive integers, comma-separated); got {item!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def _arm_groups() -> dict[str, str]:
    """Every arm name -> the first group that runs it (``core_triton``: the attention-core TFLOP/s table)."""
    where = {a.impl: "core" for a in default_arms({"core"})}
    for g in GROUPS[1:]:
        for a in default_arms({g}):
            where.setdefault(a.impl, g)
    where["core_triton"] = "kernels"
    return where


def _check_arms(names: list[str], groups: set[str], cuda: bool) -> None:
    """Named arms must exist, belong to a selected group and (on a CPU) run without CUDA."""
    where = _arm_groups()
    missing = [a for a in names if where[a] != "core" and where[a] not in groups]  # core arms always run
    if missing:
        raise UserError("--arms: " + ", ".join(f"{a} is in group {where[a]!r}" for a in missing)
                        + f", not in --groups {','.join(sorted(groups))}; add the group or drop the arm")
    if not cuda:
        cpu_ok = {a.impl for a in default_arms(set(GROUPS)) if not needs_cuda(a)}
        gpu_only = [a for a in names if a not in cpu_ok]
        if gpu_only:
            raise UserError(f"--arms: {', '.join(gpu_only)} need(s) CUDA (cuDNN, fused Triton kernels or "
                            f"FlexAttention); arms that run on a CPU: {', '.join(sorted(cpu_ok))}")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` an ``ra bench`` command line asks for. Every option is honoured or refused with a
    ``UserError``: nothing the user set is dropped (a CPU runs eager fp32 at small shapes by default and refuses
    ``--modes graph/compile`` and ``--precision bf16``)."""
    cuda_here = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda_here else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device: expected cpu, cuda or cuda:N; got {device!r}")
    cuda = device.startswith("cuda")
    if cuda and not cuda_here:
        raise UserError(f"--device {device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    groups = set(_choices(args.groups, "--groups", GROUPS)) if args.groups else set(GROUPS)
    arms = None
    if args.arms:
        arms = set(_choices(args.arms, "--arms", tuple(_arm_groups())))
        _check_arms(sorted(arms), groups, cuda)
    modes = tuple(_choices(args.modes, "--modes", MODES)) if args.modes else (MODES if cuda else ("eager",))
    if not cuda and set(modes) - {"eager"}:
        raise UserError(f"--modes {args.modes}: graph (CUDA graphs) and compile are timed on CUDA only; a CPU "
                        "runs --modes eager")
    precision = args.precision or ("bf16" if cuda else "fp32")
    if not cuda and precision == "bf16":
        raise UserError("--precision bf16: a CPU runs fp32 (or amp: fp32 parameters under bf16 autocast)")
    if cuda and precision == "fp32":
        raise UserError("--precision fp32: the flash and cuDNN SDPA backends need bf16; use bf16 or amp on CUDA")
    for name in ("repeats", "inner"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name}: expected an integer >= 1; got {getattr(args, name)}")
    cfg = BenchConfig(device=device, groups=groups, precision=precision, bias=not args.no_bias, arms=arms,
                      modes=modes, passes=tuple(_choices(args.passes, "--passes", PASSES)) if args.passes else PASSES,
                      repeats=args.repeats or 7, inner=args.inner or (20 if cuda else 3), warmup=5 if cuda else 1)
    if args.shapes is not None:
        cfg.shapes = _pairs(args.shapes, "--shapes", "x", "BxT, e.g. 8x1024,2x4096")
        if not cfg.shapes:
            raise UserError("--shapes: expected at least one BxT, e.g. 8x1024")
    elif not cuda:
        cfg.shapes = list(CPU_SHAPES)
    cfg.full_matrix_shape = cfg.shapes[0]
    if not cuda:
        cfg.widths = [CPU_WIDTH]
    if args.widths is not None:
        cfg.scaling_widths = _pairs(args.widths, "--widths", "/", "C/H, e.g. 1024/16,1280/20 ('' for none)")
        bad = [f"{c}/{h}" for c, h in cfg.scaling_widths if c % h]
        if bad:
            raise UserError(f"--widths: the width C must be a multiple of the heads H; got {', '.join(bad)}")
    elif not cuda:
        cfg.scaling_widths = []
    return cfg


def build_parser() -> argparse.ArgumentParser:
    """The ``ra bench`` argument parser (every option with its help)."""
    ap = argparse.ArgumentParser(
        prog="ra bench", description="Benchmark RA against the baseline attention block (docs/RA-SPEC.md section 4).",
        epilog="Without CUDA: small shapes, eager mode, fp32, and only the arms that run on a CPU; the report then "
               "shows paired ratios and says CPU timings are not a result.")
    from .bench_model_cli import add_arguments as add_model_arguments

    add_model_arguments(ap)
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for bench.json, bench.md and bench.png (default benchmarks/results/local)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available, else cpu)")
    ap.add_argument("--groups", default=None, help=f"comma list of arm groups: {', '.join(GROUPS)} (default all)")
    ap.add_argument("--shapes", default=None,
                    help="block input shapes BxT, e.g. 8x1024,2x4096,1x8192 (the default on CUDA; "
                         f"{','.join(f'{b}x{t}' for b, t in CPU_SHAPES)} on a CPU); the first gets the full matrix")
    ap.add_argument("--arms", default=None,
                    help="only these arms, e.g. ra_fast,channel_bias (the baselines always run: ratios need them); "
                         "unknown names are an error that lists the valid ones")
    ap.add_argument("--widths", default=None,
                    help="extra widths C/H timed at the first shape, e.g. 1024/16,1280/20; '' for none (default "
                         "1024/16,1280/20 on CUDA, none on a CPU)")
    ap.add_argument("--modes", default=None,
                    help=f"comma list of: {', '.join(MODES)} (default all on CUDA; a CPU runs eager only)")
    ap.add_argument("--passes", default=None, help=f"comma list of: {', '.join(PASSES)} (default all)")
    ap.add_argument("--precision", choices=("bf16", "amp", "fp32"), default=None,
                    help="bf16 parameters (CUDA default), amp (fp32 parameters under bf16 autocast) or fp32 "
                         "(the CPU default)")
    ap.add_argument("--no-bias", action="store_true", help="bias-free c_attn/c_proj (the seed's table)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timings per row; each is the mean of --inner calls (default 7)")
    ap.add_argument("--inner", type=int, default=None, help="calls per timing (default 20 on CUDA, 3 on a CPU)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    ap.add_argument("--render", type=Path, default=None, metavar="DIR",
                    help="re-render DIR/bench.md and bench.png from DIR/bench.json (no timing; no other option "
                         "applies)")
    return ap


def _render(args: argparse.Namespace) -> int:
    """``--render DIR``: rewrite the reports from an existing ``bench.json``."""
    set_ = [f"--{k.replace('_', '-')}" for k in TIMING_OPTIONS + ("no_bias",) if getattr(args, k) not in (None, False)]
    if set_:
        raise UserError(f"--render re-renders existing results without timing: {', '.join(set_)} do(es) not apply")
    src = args.render / "bench.json"
    if not src.is_file():
        raise UserError(f"--render {args.render}: no bench.json there (a cut run leaves bench.partial.json: rename "
                        "it to bench.json to render what it measured)")
    try:
        records = json.loads(src.read_text())
    except ValueError as exc:
        raise UserError(f"--render: {src} is not valid JSON ({exc})") from exc
    fill_ratios(records)
    write_results(records, args.render)
    print(f"re-rendered {args.render}/bench.md and bench.png from {len(records)} records")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ra bench``: time the plan, write ``bench.json/md/png`` and print the report."""
    args = build_parser().parse_args(argv)
    if args.render is not None:
        return _render(args)
    if args.model is not None:
        from .bench_model_cli import run_from_args

        return run_from_args(args)
    cfg = config_from_args(args)
    out = args.out if args.out is not None else Path("benchmarks/results/local")
    partial = out / "bench.partial.json"
    records = run_bench(cfg, progress=not args.no_progress and sys.stderr.isatty(), partial=partial)
    write_results(records, out)
    partial.unlink(missing_ok=True)
    print(markdown_report(records))
    if not cfg.device.startswith("cuda"):
        print(committed_gpu_table({r["impl"] for r in records}))
    print(f"wrote {out}/bench.json, bench.md, bench.png ({len(records)} records)")
    return 0
