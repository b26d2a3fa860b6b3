"""Per-kernel GPU time of one attention block's fwd+bwd, and of the bare attention core (torch.profiler).

What costs the time in `ra bench`'s ratios: every CUDA kernel the block launches, its GPU time per call (median
over the profiled iterations is not available per kernel; this is the mean), grouped by kernel name.
Usage: python tools/profile_kernels.py OUT_DIR [--quick]. Writes OUT_DIR/profile.json and profile.md.
Kernel durations come from CUPTI (GPU side); launch gaps are not in them (graph replay removes most gaps).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from reciprocal_attention import ReciprocalAttention
from reciprocal_attention.lab.timing import machine_versions, sdpa_context


def _kernel_table(fn, iters: int = 10, warmup: int = 5) -> list[dict]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    acc: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            acc[ev.name].append(ev.device_time)
    rows = [{"kernel": k[:110], "us_per_call": sum(v) / iters, "launches_per_call": len(v) / iters}
            for k, v in acc.items()]
    rows.sort(key=lambda r: -r["us_per_call"])
    return rows


def _block(preset: str, backend: str, C: int, H: int, T: int, disc: bool = False) -> torch.nn.Module:
    m = ReciprocalAttention.from_preset(preset, n_embd=C, n_head=H, block_size=max(T, 1024), backend=backend)
    if disc:
        with torch.no_grad():
            m.d_bias.normal_(0.0, 0.5)
    return m.cuda().to(torch.bfloat16)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    res: dict = {"versions": machine_versions(), "blocks": [], "core": []}
    arms = [("baseline_cudnn", "standard", "sdpa", "cudnn", False), ("ra_fast", "ra", "sdpa", "cudnn", False),
            ("seed_fast", "seed", "sdpa", "cudnn", False),
            ("triton_bias", "ra_disc", "triton", "any", True), ("channel_bias", "ra_disc_channel", "sdpa", "cudnn", True),
            ("full_triton", "full", "triton", "any", False)]
    for B, T in ((8, 1024), (2, 4096)):
        for name, preset, backend, sdpa, disc in arms:
            m = _block(preset, backend, 768, 12, T, disc)
            x = torch.randn(B, T, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn_like(x)
            with sdpa_context(sdpa):
                rows = _kernel_table(lambda: m(x).backward(gy))
            total = sum(r["us_per_call"] for r in rows)
            res["blocks"].append({"arm": name, "B": B, "T": T, "total_us": total, "kernels": rows})
            print(f"== {name} B={B} T={T}: {total:.1f} us of kernels per fwd+bwd")
            for r in rows[:14]:
                print(f"   {r['us_per_call']:8.2f} us  x{r['launches_per_call']:.0f}  {r['kernel']}")
    from reciprocal_attention.ops.flash import flash_ra_attention

    for B, T in ((8, 1024), (2, 4096)):
        H, D = 12, 64
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        flops = 4 * B * H * T * T * D / 2 * 3.5  # causal fwd+bwd, FlashAttention convention
        cases = {
            "cudnn": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do),
            "triton_plain": lambda: flash_ra_attention(q, k, v, scale=1 / math.sqrt(D)).backward(do),
        }
        for name, fn in cases.items():
            with sdpa_context("cudnn" if name == "cudnn" else "any"):
                rows = _kernel_table(fn)
            total = sum(r["us_per_call"] for r in rows)
            res["core"].append({"impl": name, "B": B, "T": T, "total_us": total,
                                "tflops_kernels": flops / total / 1e6, "kernels": rows})
            print(f"== core {name} B={B} T={T}: {total:.1f} us, {flops / total / 1e6:.1f} TFLOP/s (kernel time)")
            for r in rows[:8]:
                print(f"   {r['us_per_call']:8.2f} us  x{r['launches_per_call']:.0f}  {r['kernel']}")
    (out / "profile.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Kernel profile (fwd+bwd, bf16) on {res['versions']['device']}",
             "", f"torch {res['versions']['torch']}, triton {res['versions']['triton']}. GPU time per call "
             "(CUPTI kernel durations, launch gaps excluded).", ""]
    for b in res["blocks"]:
        lines += [f"## block {b['arm']} B={b['B']} T={b['T']}: {b['total_us']:.1f} us", "",
                  "| us | launches | kernel |", "|---|---|---|"]
        lines += [f"| {r['us_per_call']:.2f} | {r['launches_per_call']:.0f} | `{r['kernel']}` |" for r in b["kernels"]]
        lines.append("")
    for c in res["core"]:
        lines += [f"## core {c['impl']} B={c['B']} T={c['T']}: {c['total_us']:.1f} us, "
                  f"{c['tflops_kernels']:.1f} TFLOP/s", "", "| us | launches | kernel |", "|---|---|---|"]
        lines += [f"| {r['us_per_call']:.2f} | {r['launches_per_call']:.0f} | `{r['kernel']}` |" for r in c["kernels"]]
        lines.append("")
    (out / "profile.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
