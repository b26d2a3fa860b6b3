"""The ``ra bench --model gpt2`` command: its options, the arms' validation, the child processes (to measure
host-bound modes in several processes, and the arms of a process-wide setting, ``bench_model.PROCESS_VARIANTS``)
and the result files (``model.json`` / ``.md`` / ``.png``, merged into earlier records on request). What is
measured and how: :mod:`reciprocal_attention.lab.bench_model`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from .bench_model import (ARM_VARIANTS, MODES, PRESETS, PROCESS_VARIANTS, ModelBenchConfig, _process_variants_here,
                          run_model_bench)
from .bench_model_report import combine_processes, merge_records, record_key, render_markdown, render_png


def _arms(value: str) -> tuple[str, ...]:
    """``--model-presets``: presets, and ``PRESET+VARIANT`` arms of the project's RA presets."""
    from .errors import UserError

    items = tuple(s.strip() for s in value.split(",") if s.strip())
    for item in items:
        preset, plus, variant = item.partition("+")
        if preset not in PRESETS or (plus and (variant not in ARM_VARIANTS or preset in ("standard", "hf-gpt2"))):
            raise UserError(f"--model-presets: unknown arm {item!r}; valid: {', '.join(PRESETS)}, or PRESET+VARIANT "
                            f"for an RA preset with VARIANT one of {', '.join(ARM_VARIANTS)}")
    if not items:
        raise UserError(f"--model-presets: no arm in {value!r}; valid: {', '.join(PRESETS)}")
    return items


def _in_processes(args: Any, device: str, processes: int, presets: str, modes: str, no_decode: bool,
                  env: dict[str, str] | None = None,
                  on_run: Callable[[list[list[dict[str, Any]]]], None] | None = None) -> list[list[dict[str, Any]]]:
    """The records of ``ra bench --model`` with these arms and modes run in ``processes`` fresh processes, one
    after the other (``env`` added to their environment), one list per process; ``on_run(runs so far)`` after
    each (a run cut short keeps what it measured)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    runs: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="ra-bench-model-") as tmp:
        for k in range(processes):
            out = Path(tmp) / f"process-{k}"
            cmd = [sys.executable, "-m", "reciprocal_attention.lab.cli", "bench", "--model", args.model,
                   "--model-presets", presets, "--model-modes", modes,
                   "--model-shapes", args.model_shapes, "--model-rounds", str(args.model_rounds),
                   "--device", device, "--out", str(out)] + (["--no-decode"] if no_decode else [])
            print(f"[bench --model] process {k + 1} of {processes}: {presets} ({modes})"
                  + (f" with {' '.join(f'{n}={v}' for n, v in env.items())}" if env else ""), flush=True)
            done = subprocess.run(cmd, env={**os.environ, **(env or {})})
            if done.returncode != 0:
                raise RuntimeError(f"the benchmark process {k + 1} of {processes} exited with {done.returncode}")
            runs.append(json.loads((out / "model.json").read_text()))
            if on_run is not None:
                on_run(runs)
    return runs


def _process_variant_records(args: Any, device: str, processes: int, arms: tuple[str, ...],
                             modes: tuple[str, ...], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The records of process-wide variant arms (:data:`PROCESS_VARIANTS`), per variant in child processes started
    with its environment, where they run against their own baseline. Eager mode is skipped (the variants change how
    torch.compile launches)."""
    out: list[dict[str, Any]] = []
    compiled = tuple(m for m in modes if m != "eager")
    for variant, (env, _) in PROCESS_VARIANTS.items():
        mine = [a for a in arms if a.partition("+")[2] == variant]
        if not mine:
            continue
        if not compiled:
            log(f"  eager: skipping {', '.join(mine)} (the same eager model as its preset)")
            continue
        runs = _in_processes(args, device, processes, ",".join(mine), ",".join(compiled), True, env)
        out += combine_processes(runs) if processes > 1 else runs[0]
    return out


def _check_process_variants(presets: tuple[str, ...], modes: tuple[str, ...]) -> None:
    """In a process started with a variant's environment every compiled arm runs with it, so each must say so in its
    name (the baseline ``standard`` has no user-defined Triton kernels and is the same either way)."""
    from .errors import UserError

    for variant in _process_variants_here():
        plain = [a for a in presets if a != "standard" and a.partition("+")[2] != variant]
        if plain and any(m != "eager" for m in modes):
            env = " ".join(f"{k}={v}" for k, v in PROCESS_VARIANTS[variant][0].items())
            raise UserError(f"--model-presets: {env} is set, so this process compiles {', '.join(plain)} with "
                            f"'{variant}': name them {', '.join(a.partition('+')[0] + '+' + variant for a in plain)}, "
                            f"or unset it")


def _csv(value: str, option: str, valid: tuple[str, ...]) -> tuple[str, ...]:
    from .errors import UserError

    items = tuple(s.strip() for s in value.split(",") if s.strip())
    bad = [s for s in items if s not in valid]
    if bad or not items:
        raise UserError(f"{option}: unknown {bad or value!r}; valid: {', '.join(valid)}")
    return items


def _shapes(value: str) -> tuple[tuple[int, int], ...]:
    from .errors import UserError

    try:
        out = tuple(tuple(int(n) for n in s.lower().split("x")) for s in value.split(",") if s.strip())
    except ValueError:
        out = ()
    if not out or any(len(s) != 2 or min(s) < 1 for s in out):
        raise UserError(f"--model-shapes must be a comma list of BxT, e.g. 8x1024,2x4096; got {value!r}")
    return out  # type: ignore[return-value]


def add_arguments(ap: Any) -> None:
    """The ``ra bench --model`` options (added to ``ra bench``'s parser)."""
    ap.add_argument("--model", choices=("gpt2",), default=None,
                    help="benchmark the whole GPT-2 small training step and KV-cache decoding instead of one block")
    ap.add_argument("--model-presets", default=",".join(PRESETS),
                    help=f"with --model: comma list of arms from {', '.join(PRESETS)} (standard is the baseline), "
                         f"or PRESET+VARIANT, VARIANT one of: " + "; ".join(f"{k}: {v}" for k, v in ARM_VARIANTS.items()))
    ap.add_argument("--model-modes", default=",".join(MODES), help=f"with --model: comma list of {', '.join(MODES)}")
    ap.add_argument("--model-shapes", default="8x1024,2x4096", help="with --model: comma list of BxT training shapes")
    ap.add_argument("--model-rounds", type=int, default=7, help="with --model: alternating timing rounds per arm")
    ap.add_argument("--no-decode", action="store_true", help="with --model: skip the KV-cache decoding records")
    ap.add_argument("--model-processes", type=int, default=1,
                    help="with --model: measure every arm in this many fresh processes, one after the other, and "
                         "record the median of their ratios with each one (host-bound modes vary between processes)")
    ap.add_argument("--model-merge", action="store_true",
                    help="with --model and --out: keep the records of OUT/model.json this run does not measure again "
                         "(same kind, model, preset, mode, B, T: the new record replaces the old)")


def run_from_args(args: Any) -> int:
    """``ra bench --model gpt2 ...``: run, print the table, write model.json/.md/.png to ``--out``."""
    import json
    from pathlib import Path

    from .atomic import write_text
    from .errors import UserError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")
    cfg = ModelBenchConfig(presets=_arms(args.model_presets),
                           modes=_csv(args.model_modes, "--model-modes", MODES),
                           shapes=_shapes(args.model_shapes), rounds=args.model_rounds, device=device,
                           decode_batches=() if args.no_decode else (1, 8))
    if device == "cpu" and cfg.modes != ("eager",):
        raise UserError("--model-modes: compile modes of the whole model are timed on CUDA only; use "
                        "--model-modes eager on a CPU")
    print(f"[bench --model] {len(cfg.presets)} arms x {len(cfg.modes)} modes x {len(cfg.shapes)} shapes on {device}")
    out = Path(args.out) if args.out is not None else None
    old: list[dict[str, Any]] = []
    if getattr(args, "model_merge", False):
        if out is None:
            raise UserError("--model-merge needs --out DIR (the model.json to merge into)")
        if (out / "model.json").exists():
            try:
                old = json.loads((out / "model.json").read_text())
                for r in old:
                    record_key(r)
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"--model-merge: {out / 'model.json'} is not a list of model records ({e}); "
                                f"move it away or drop --model-merge") from None

    def write(records: list[dict[str, Any]], final: bool = False) -> None:
        if out is None:
            return
        records = merge_records(old, records)
        out.mkdir(parents=True, exist_ok=True)
        # atomic: a run killed mid-write keeps the previous file (with --model-merge, every earlier record)
        write_text(out / "model.json", json.dumps(records, indent=1, allow_nan=False) + "\n")
        write_text(out / "model.md", render_markdown(records))
        if final:
            render_png(records, out / "model.png")

    processes = getattr(args, "model_processes", 1)
    if not isinstance(processes, int) or processes < 1:
        raise UserError(f"--model-processes must be an int >= 1; got {processes!r}")
    _check_process_variants(cfg.presets, cfg.modes)
    ready = _process_variants_here()
    in_child = tuple(a for a in cfg.presets if a.partition("+")[2] in set(PROCESS_VARIANTS) - ready)
    here = tuple(a for a in cfg.presets if a not in in_child)
    records: list[dict[str, Any]] = []
    if here and processes == 1:
        records = run_model_bench(replace(cfg, presets=here), on_record=write)
    elif here:
        records = combine_processes(_in_processes(args, device, processes, ",".join(here), args.model_modes,
                                                  args.no_decode, on_run=lambda runs: write(combine_processes(runs))))
    if in_child:
        records = records + _process_variant_records(args, device, processes, in_child, cfg.modes)
    print(render_markdown(records))  # this run's records; the files hold the merged ones
    write(records, final=True)
    if out is not None:
        print(f"wrote {out / 'model.json'}, " + ", ".join(f for f in ("model.md", "model.png") if (out / f).exists()))
    return 0
