"""A/B of the Triton attention kernel's two backward designs on one GPU, in one process (dev aid, issue 4).

For each shape (B*T = 8192, H = 12, D = 64, bf16, causal) and kernel flag set (plain; learned column bias; `full`
with a, b and the bias), times fwd+bwd of `flash_ra_attention` with each `flash.BWD_MODES` design (two-pass,
one-pass with the ordered dQ hand-over, one-pass with atomic adds; CUDA-graph replay, the autotuned configs), and cuDNN SDPA for the plain case. Prints and writes a JSON list of
records with ms and attention-core TFLOP/s (FlashAttention convention: 3.5x the causal forward's 2 matmuls; the
reciprocal term's extra QK^T work is not counted, so `full` TFLOP/s is a time ratio, not a utilisation).
Usage: python scripts/flash_bwd_ab.py OUT.json [--shapes 8x1024,2x4096,1x8192] [--cases plain,bias,full]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from reciprocal_attention.bench import Timer, _versions, sdpa_context
from reciprocal_attention.kernels import flash


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shapes", default="8x1024,2x4096,1x8192")
    ap.add_argument("--cases", default="plain,bias,full")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10)
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, warmup=3, repeats=a.repeats, inner=a.inner)
    H, D = 12, 64
    versions = _versions()
    default = flash.BWD_MODE
    recs = []
    for shape in a.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        do = torch.randn_like(q)
        bias = torch.randn(H, T, device=dev, requires_grad=True)
        ga = (torch.rand(H, device=dev) + 0.5).requires_grad_()
        gb = (torch.rand(H, device=dev) - 0.5).requires_grad_()
        flops = 4 * B * H * T * T * D / 2 * 3.5
        cases = {
            "plain": (lambda: flash_call(q, k, v), (q, k, v)),
            "bias": (lambda: flash_call(q, k, v, col_bias=bias), (q, k, v, bias)),
            "full": (lambda: flash_call(q, k, v, col_bias=bias, a=ga, b=gb), (q, k, v, bias, ga, gb)),
        }
        for case, (f, leaves) in cases.items():
            if case not in a.cases.split(","):
                continue
            arms = [(m, f) for m in flash.BWD_MODES]  # twopass, onepass, atomic
            if case == "plain":
                arms.append(("cudnn", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
            for mode, fn in arms:
                if mode in flash.BWD_MODES:
                    flash.BWD_MODE = mode

                def step(fn=fn, leaves=leaves):
                    torch.autograd.grad(fn(), leaves, do)

                with sdpa_context("cudnn" if mode == "cudnn" else "any"):
                    step()
                    times = timer.measure(timer.graphed(step))
                med = statistics.median(times)
                rec = {"case": case, "bwd": mode, "B": B, "T": T, "H": H, "D": D, "pass": "fwd+bwd",
                       "ms_median": med, "ms_min": min(times), "tflops": flops / (med * 1e-3) / 1e12, **versions}
                recs.append(rec)
                print(f"{case:6s} {mode:8s} B={B} T={T}: {med:.4f} ms  {rec['tflops']:.1f} TFLOP/s", flush=True)
    flash.BWD_MODE = default
    json.dump(recs, open(a.out, "w"), indent=1)


def flash_call(q, k, v, **kw):
    return flash.flash_ra_attention(q, k, v, **kw)


if __name__ == "__main__":
    main()
