"""``ra compare``: the main job. The speed table and a short quality comparison of the baseline and RA.

On the embedded default: the offline English corpus (built on first use by ``ra data prepare``), the GPT-2
attention block for speed, and paired runs of ``standard`` and the recommended ``ra`` preset for quality. On a CPU
it runs tiny sizes (a demonstration of the protocol, not a result, and it says so): the speed section shows paired
ratios and, for comparison, the GPU results committed under ``benchmarks/results/``. With CUDA it runs the real
sizes (CUDA-graph timings, the quality-gpu preset). Every training run shows live progress (step, loss, ETA), and
the job ends with a summary. Results go to ``--out`` (``speed/`` and ``quality/`` with JSON, markdown and PNG).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import bench, quality
from .bench_report import committed_gpu_table
from .data import prepare
from .errors import UserError
from .quality_report import markdown as quality_markdown, verdict_sentence

ARMS = ["standard", "ra"]


def ensure_corpus(data_dir: Path) -> None:
    """Build the offline corpus into ``data_dir`` unless a manifest is already there (never a synthetic fallback)."""
    if (data_dir / "manifest.json").exists():
        return
    print(f"[compare] building the offline corpus in {data_dir} (first use; downloads the source packages once)",
          flush=True)
    prepare(data_dir)


# --------------------------------------------------------------------------------------------------------------
# The two phases and the summary
# --------------------------------------------------------------------------------------------------------------

def speed_phase(out: Path, cuda: bool) -> list[dict[str, Any]]:
    """Time the baseline block against RA; print the report (on a CPU: paired ratios and the committed GPU
    table)."""
    cfg = bench.BenchConfig(groups={"core"}, device="cuda" if cuda else "cpu")
    if cuda:
        cfg.shapes, cfg.full_matrix_shape = [(8, 1024), (2, 4096)], (8, 1024)
        cfg.scaling_widths, cfg.modes, cfg.inner = [], ("eager", "graph"), 10
    else:
        cfg.shapes, cfg.full_matrix_shape, cfg.widths, cfg.scaling_widths = [(2, 128)], (2, 128), [(128, 4)], []
        cfg.modes, cfg.precision, cfg.repeats, cfg.inner, cfg.warmup = ("eager",), "fp32", 9, 3, 2
    records = bench.run_bench(cfg, progress=sys.stderr.isatty())
    bench.write_results(records, out / "speed")
    print(bench.markdown_report(records), flush=True)
    if not cuda:
        print(committed_gpu_table({r["impl"] for r in records}), flush=True)
    return records


def quality_phase(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Paired training runs of ``standard`` and ``ra`` with live progress; the study's report."""
    ensure_corpus(args.data)
    overrides = [f"data.dir={args.data}"]
    if args.steps:
        overrides.append(f"budget.max_steps={args.steps}")
    if cuda:
        overrides.append("budget.max_tokens=2000000")
    else:
        overrides.append(f"system.log_interval={max(1, min(5, (args.steps or 120) // 10))}")  # a live ETA
    qc = quality.QualityConfig(arms=list(ARMS), seeds=args.seeds, preset="quality-gpu" if cuda else "compare-cpu",
                               overrides=overrides, out_dir=str(args.out / "quality"),
                               parallel=len(args.seeds) * len(ARMS) if cuda else 2, mqar=False)
    print(f"[compare] quality: {len(qc.seeds) * len(ARMS)} training runs ({', '.join(ARMS)} x seeds "
          f"{', '.join(map(str, qc.seeds))}), {qc.parallel} at a time, preset {qc.preset}", flush=True)
    with quality.run_progress(qc):
        res = quality.study(qc)
    print(quality_markdown(res), flush=True)
    return res


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m {s:02d}s" if m else f"{s}s"


def summary(records: list[dict[str, Any]] | None, res: dict[str, Any] | None, times: dict[str, float],
            out: Path, cuda: bool) -> str:
    """The end summary: what ran, how long each phase took, the headline numbers and where the files are."""
    dev = torch.cuda.get_device_name() if cuda else "CPU"
    lines = ["", "== ra compare: summary ==",
             f"device: {dev}" + ("" if cuda else " (tiny sizes: a demonstration of the protocol, not a result)")]
    if records is not None:
        key = "ratio_vs_baseline" if cuda else "ratio_paired"
        mode = "graph" if cuda else "eager"
        ra = [r for r in records if r["impl"] == "ra_fast" and r["mode"] == mode and r.get(key)]
        cells = ", ".join(f"{r['sdpa']} {r['B']}x{r['T']} {r['pass']} {r[key]:.2f}x" for r in ra) or "no rows"
        lines.append(f"speed ({_duration(times['speed'])}): RA fast path / baseline, {mode}, paired: {cells}"
                     + ("" if cuda else "; CPU timings are not a result (the committed GPU table is above)"))
        lines.append(f"  files: {out / 'speed'}/bench.md, bench.png, bench.json")
    if res is not None:
        lines.append(f"quality ({_duration(times['quality'])}): {verdict_sentence(res)}")
        for arm, st in res["arms"].items():
            if st["mean"] is None:
                lines.append(f"  {arm}: no finished run")
                continue
            diffs = ", ".join(f"{d:+.4f}" for d in st.get("paired_diff", {}).values())
            lines.append(f"  {arm}: val loss {st['mean']:.4f}" + (f" +- {st['std']:.4f}" if st["std"] else "")
                         + (f"; paired diff vs standard per seed {diffs}" if diffs else ""))
        lines.append(f"  files: {out / 'quality'}/quality.md, quality.png, quality.json, runs/*/train.log")
    lines.append(f"total: {_duration(sum(times.values()))}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

def _seeds(value: str) -> list[int]:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise UserError(f"--seeds: expected distinct comma-separated integers, e.g. 0,1; got {value!r}")
    return [int(p) for p in parts]


def build_parser() -> argparse.ArgumentParser:
    """The ``ra compare`` argument parser (every option with its help)."""
    ap = argparse.ArgumentParser(prog="ra compare",
                                 description="The main job: the speed table and a short quality comparison of the "
                                             "baseline and RA (tiny sizes on a CPU, the real ones on CUDA).",
                                 epilog="The specification: docs/RA-SPEC.md (speed: section 4; quality: section 5).")
    ap.add_argument("--out", type=Path, default=Path("runs/compare"),
                    help="results folder: speed/ and quality/ (default runs/compare); a rerun resumes its runs")
    ap.add_argument("--data", type=Path, default=None,
                    help="offline corpus folder (default data/corpus; built on first use by `ra data prepare`)")
    ap.add_argument("--seeds", default=None, help="quality seeds, e.g. 0,1 (default 0,1 on a CPU, 0,1,2 on CUDA)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per quality run (default: the preset's, 120 on a CPU; on CUDA a 2M-token "
                         "budget)")
    ap.add_argument("--skip-speed", action="store_true", help="skip the speed table")
    ap.add_argument("--skip-quality", action="store_true", help="skip the quality runs")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``ra compare``: the speed phase, the quality phase, the summary."""
    args = build_parser().parse_args(argv)
    if args.skip_speed and args.skip_quality:
        raise UserError("--skip-speed and --skip-quality together leave nothing to run")
    if args.skip_quality:
        set_ = [f"--{k}" for k in ("data", "seeds", "steps") if getattr(args, k) is not None]
        if set_:
            raise UserError(f"{', '.join(set_)} set(s) the quality runs, which --skip-quality skips")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps: expected an integer >= 1; got {args.steps}")
    cuda = torch.cuda.is_available()
    args.seeds = _seeds(args.seeds or ("0,1,2" if cuda else "0,1"))
    args.data = args.data or Path("data/corpus")
    print(f"[compare] device: {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}"
          + ("" if cuda else "; tiny sizes: a demonstration of the protocol, not a result"), flush=True)
    records, res, times = None, None, {}
    if not args.skip_speed:
        t0 = time.time()
        records = speed_phase(args.out, cuda)
        times["speed"] = time.time() - t0
    if not args.skip_quality:
        t0 = time.time()
        res = quality_phase(args, cuda)
        times["quality"] = time.time() - t0
    print(summary(records, res, times, args.out, cuda), flush=True)
    return 0

