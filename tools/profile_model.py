"""Kernel-by-kernel profile of the whole GPT-2 training step, RA against the baseline (torch.profiler, CUDA).

    python tools/profile_model.py OUT_DIR [--presets ra,ra_disc_channel,hf-gpt2] [--mode compile] [--shape 8x1024]

Writes ``OUT_DIR/profile_model.md`` (per preset: GPU time per kernel name, summed over the profiled steps, and the
difference to the baseline), ``profile_model.json``, and gzipped Chrome traces ``trace_<preset>.json.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from reciprocal_attention.lab.bench_model import ModelBenchConfig, _Arm, _batch, _gpt, _hf


def kernel_times(arm: _Arm, batch, steps: int, trace: Path) -> dict[str, float]:
    """GPU microseconds per kernel name over ``steps`` steps."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            arm.step(*batch)
        torch.cuda.synchronize()
    raw = trace.with_suffix("")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if ev.device_type == torch.autograd.DeviceType.CUDA and us:
            out[ev.key] = out.get(ev.key, 0.0) + us / steps
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--presets", default="ra,ra_disc_channel,hf-gpt2",
                    help="comma list of RA presets (and hf-gpt2: its convert_gpt2 conversion vs transformers' GPT-2)")
    ap.add_argument("--mode", default="compile", choices=("eager", "compile", "compile-cudagraphs"))
    ap.add_argument("--shape", default="8x1024", help="BxT")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per model")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_model: needs CUDA", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    B, T = (int(n) for n in args.shape.split("x"))
    dev = torch.device("cuda")
    cfg = ModelBenchConfig(device="cuda")
    batch = _batch(B, T, 50257, dev)
    torch._dynamo.config.recompile_limit = 64
    result: dict[str, dict[str, float]] = {}
    presets = args.presets.split(",")
    # hf-gpt2: transformers' GPT2LMHeadModel (sdpa) against its convert_gpt2 conversion
    names = ["standard"] * any(p != "hf-gpt2" for p in presets) + ["hf-gpt2-baseline"] * ("hf-gpt2" in presets)
    baseline_of = {p: "hf-gpt2-baseline" if p == "hf-gpt2" else "standard" for p in presets}
    for name in names + presets:
        if name.startswith("hf-gpt2"):
            arm = _Arm(_hf(cfg, name == "hf-gpt2", T, dev), True, args.mode, dev, 50257)
        else:
            arm = _Arm(_gpt(cfg, name, T, dev), False, args.mode, dev, 50257)
        for _ in range(5):
            arm.step(*batch)
        result[name] = kernel_times(arm, batch, args.steps, args.out / f"trace_{name}.json.gz")
        del arm
        torch.cuda.empty_cache()
    lines = [f"# Kernel time per training step: GPT-2 small, {args.mode}, B x T = {B} x {T}", "",
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}. GPU microseconds per step, summed by kernel "
             f"name over {args.steps} profiled steps (`tools/profile_model.py`).", ""]
    for preset in presets:
        times, base = result[preset], result[baseline_of[preset]]
        tot, btot = sum(times.values()), sum(base.values())
        lines += [f"## {preset}: {tot:.0f} us vs baseline {btot:.0f} us ({tot / btot:.3f}x)", "",
                  "| kernel | RA us | baseline us | difference |", "|---|---|---|---|"]
        names = sorted(set(times) | set(base), key=lambda k: -abs(times.get(k, 0.0) - base.get(k, 0.0)))
        for k in names[:25]:
            lines.append(f"| `{k[:90]}` | {times.get(k, 0.0):.1f} | {base.get(k, 0.0):.1f} | "
                         f"{times.get(k, 0.0) - base.get(k, 0.0):+.1f} |")
        lines.append("")
    (args.out / "profile_model.md").write_text("\n".join(lines) + "\n")
    (args.out / "profile_model.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "mode": args.mode, "B": B, "T": T,
         "baseline_of": baseline_of, "us_per_step": result}, indent=1))
    print("\n".join(lines[:60]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
