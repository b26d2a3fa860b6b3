"""Fused weight-space fold micro-benchmark (dev aid, one CUDA card): microseconds per call and the tile sweep.

GPT-2 small's ``c_attn`` (C=768, H=12, D=64, R=8, ``same_flop``, fp32 parameters with bias). Three arms, eager and
CUDA-graph replay, forward (no grad) and forward + backward: the fused gated fold with bf16 output (the module's
path), the PyTorch fold (``fold.fold_qkv_weight``) + cast, and the baseline's plain ``weight.to(bf16)`` cast. Then
the raw kernels' tiles (graph replay), from which ``ops/fold.py`` takes its defaults. CUDA events; each figure is
the median (min-max) of 7 timings of 50 calls.

    python tools/fold_bench.py OUT_JSON        (stage ``foldsweep`` of scripts/gpu_suite.sh)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from reciprocal_attention import fold
from reciprocal_attention.lab.timing import Timer, machine_versions
from reciprocal_attention.ops import fold as kfold
from reciprocal_attention.ops.fold import fused_fold_gated

H, D, R = 12, 64, 8
C = H * D


def time_us(fn: Callable[[], object], graph: bool, inner: int = 50, reps: int = 7) -> tuple[float, float, float]:
    """Median, min, max microseconds per call of ``fn`` (CUDA events around ``inner`` calls, ``reps`` times); with
    ``graph`` the ``inner`` calls are captured in one CUDA graph and replayed."""
    dev = torch.device("cuda")
    if graph:
        timer = Timer(dev, warmup=1, repeats=reps, inner=1)
        times = [t * 1e3 / inner for t in timer.measure(timer.graphed(lambda: [fn() for _ in range(inner)]))]
    else:
        times = [t * 1e3 for t in Timer(dev, warmup=3, repeats=reps, inner=inner).measure(fn)]
    return statistics.median(times), min(times), max(times)


def inputs(seed: int = 11) -> list[torch.Tensor]:
    """``[weight, bias, W, w_std, w_rec]`` at GPT-2 small's sizes, fp32, requiring grad; gates of both signs."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).cuda().requires_grad_()
    w_std = (torch.rand(H, generator=g) * 2 - 0.5).cuda().requires_grad_()
    w_rec = (torch.rand(H, generator=g) + 0.5).cuda().requires_grad_()
    return [rnd(3 * C, C, scale=0.02), rnd(3 * C, scale=0.02), rnd(D, R, scale=0.3), w_std, w_rec]


def arms(ins: list[torch.Tensor]) -> list[tuple[str, Callable[[], tuple], int]]:
    """``(name, fn -> (weight, bias), output rows)``."""
    weight, b, W, w_std, w_rec = ins

    def fused() -> tuple:  # the module's path: signed gate sides formed in the kernels
        return fused_fold_gated(weight, b, W, w_std, w_rec, H, "same_flop", out_dtype=torch.bfloat16)

    def torch_fold() -> tuple:
        qs, ks = fold.gate_sides(w_std, "signed")
        qr, kr = fold.gate_sides(w_rec, "signed")
        w, bb = fold.fold_qkv_weight(weight, b, W, qs, ks, qr, kr, None, H, "same_flop")
        return w.to(torch.bfloat16), bb.to(torch.bfloat16)

    def cast() -> tuple:
        return weight.to(torch.bfloat16), b.to(torch.bfloat16)

    rows = 2 * H * D + C  # same_flop: Q~/K~ at width D
    return [("fused gated fold (bf16 out)", fused, rows), ("fold.fold_qkv_weight + cast", torch_fold, rows),
            ("plain weight.to(bf16) cast", cast, 3 * C)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the JSON file to write")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("fold_bench: needs a CUDA GPU (run it in scripts/gpu_suite.sh, stage foldsweep)", file=sys.stderr)
        return 2
    ins = inputs()
    record = {**machine_versions(), "shape": {"C": C, "H": H, "R": R, "variant": "same_flop", "bias": True},
              "unit": "us per call", "arms": [], "sweep": []}
    print(f"{record['device']}, torch {record['torch']}, triton {record['triton']}; C={C} H={H} R={R}; us per call")
    for name, fn, rows in arms(ins):
        gw = torch.randn(rows, C, device="cuda").to(torch.bfloat16)
        gb = torch.randn(rows, device="cuda").to(torch.bfloat16)

        def fwd(fn: Callable[[], tuple] = fn) -> None:
            with torch.no_grad():
                fn()

        def fwd_bwd(fn: Callable[[], tuple] = fn, gw: torch.Tensor = gw, gb: torch.Tensor = gb) -> None:
            w, bb = fn()
            torch.autograd.grad([w, bb], ins, [gw, gb], allow_unused=True)

        for mode in ("eager", "graph"):
            f, fb = time_us(fwd, mode == "graph"), time_us(fwd_bwd, mode == "graph")
            record["arms"].append({"arm": name, "mode": mode, "fwd": f, "fwd_bwd": fb})
            print(f"{name:32s} {mode:6s} fwd {f[0]:8.2f}  fwd+bwd {fb[0]:8.2f}")
    signed = (H, "same_flop", kfold.GATE_MODES["signed"], None, False)
    args32 = (*(t.detach() for t in ins), *signed)
    args16 = (*(t.detach().to(torch.bfloat16) for t in ins), *signed)
    gwf = torch.randn(2 * H * D + C, C, device="cuda").to(torch.bfloat16)
    gbf = torch.randn(2 * H * D + C, device="cuda").to(torch.bfloat16)
    record["defaults"] = {"fwd": kfold._config(D, R, C), "bwd": kfold._config(D, R, C, bwd=True)}
    for bc in (32, 64, 128):
        for nw in (4, 8):
            t = time_us(lambda: kfold._fold_forward_impl(*args32, torch.bfloat16, block_c=bc, num_warps=nw), True)
            record["sweep"].append({"kernel": "fwd", "BLOCK_C": bc, "num_warps": nw, "us": t})
    # backward: fp32 parameters (tf32x3 dots; "bwd") and bf16 parameters (one tf32 product; "bwd16")
    for kernel, a in (("bwd", args32), ("bwd16", args16)):
        for bd in (16, 32, 64):
            for bc in (32, 64):
                for nw in (2, 4, 8):
                    t = time_us(lambda: kfold._fold_backward_impl(gwf, gbf, *a, block_c=bc, num_warps=nw,
                                                                  block_d=bd), True)
                    record["sweep"].append({"kernel": kernel, "BLOCK_D": bd, "BLOCK_C": bc, "num_warps": nw,
                                            "us": t})
    for row in record["sweep"]:
        tiles = " ".join(f"{k}={row[k]}" for k in ("BLOCK_D", "BLOCK_C", "num_warps") if k in row)
        print(f"  {row['kernel']:5s} {tiles:34s} {row['us'][0]:7.2f} us")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
