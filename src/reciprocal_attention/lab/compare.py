"""``ra compare``: the main job. The speed table and a short quality comparison of the baseline and RA.

On the embedded default: the offline English corpus (built on first use by ``ra data prepare``), the GPT-2
attention block for speed, and paired runs of ``standard`` and the recommended ``ra`` preset for quality. On a CPU
it runs tiny sizes (a few minutes, and it says so); on a GPU the real ones (CUDA-graph timings, the quality-gpu
preset). Results go to ``--out`` (``speed/`` and ``quality/`` with JSON, markdown and PNG).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import bench, quality
from .data import prepare


def ensure_corpus(data_dir: Path) -> None:
    """Build the offline corpus into ``data_dir`` unless a manifest is already there (never a synthetic fallback)."""
    if (data_dir / "manifest.json").exists():
        return
    print(f"[compare] building the offline corpus in {data_dir} (first use; downloads the source packages once)",
          flush=True)
    prepare(data_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ra compare", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument("--data", type=Path, default=Path("data/corpus"), help="offline corpus (built if missing)")
    ap.add_argument("--seeds", default=None, help="quality seeds (default 0,1 on CPU, 0,1,2 on GPU)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per quality run (CPU default 120)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    t0 = time.time()
    print(f"[compare] device: {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}"
          + ("" if cuda else " -- no GPU: tiny sizes, a demonstration of the protocol, not a result"), flush=True)
    if not args.skip_speed:
        cfg = bench.BenchConfig(groups={"core"}, device="cuda" if cuda else "cpu")
        if cuda:
            cfg.shapes, cfg.full_matrix_shape = [(8, 1024), (2, 4096)], (8, 1024)
            cfg.scaling_widths, cfg.modes, cfg.inner = [], ("eager", "graph"), 10
        else:
            cfg.shapes, cfg.full_matrix_shape, cfg.widths, cfg.scaling_widths = [(2, 128)], (2, 128), [(128, 4)], []
            cfg.modes, cfg.precision, cfg.repeats, cfg.inner, cfg.warmup = ("eager",), "fp32", 5, 3, 2
        records = bench.run_bench(cfg, progress=False)
        bench.write_results(records, args.out / "speed")
        print(bench.markdown_report(records), flush=True)
    if not args.skip_quality:
        ensure_corpus(args.data)
        seeds = [int(s) for s in (args.seeds or ("0,1,2" if cuda else "0,1")).split(",")]
        overrides = [f"data.dir={args.data}"]
        if args.steps:
            overrides.append(f"budget.max_steps={args.steps}")
        if cuda:
            overrides.append("budget.max_tokens=2000000")
        qc = quality.QualityConfig(arms=["standard", "ra"], seeds=seeds,
                                   preset="quality-gpu" if cuda else "compare-cpu", overrides=overrides,
                                   out_dir=str(args.out / "quality"), parallel=len(seeds) * 2 if cuda else 2,
                                   mqar=False)
        res = quality.study(qc)
        print(quality.markdown(res), flush=True)
    print(f"[compare] done in {time.time() - t0:.0f}s; results under {args.out}/", flush=True)
    return 0
