"""Host overhead of an eager fwd+bwd of the attention block (dev aid): wall ms per call, CUDA-synchronised.

Compares the baseline block, the RA fast path as shipped (kernels launched directly when eager), and the same with
every launch routed through torch.library.wrap_triton (the behaviour before), on one card in one process.
Usage: python scripts/eager_overhead.py OUT_JSON
"""
import json
import sys
import time

import torch

import reciprocal_attention.kernels.flash as kflash
import reciprocal_attention.kernels.fold as kfold
from reciprocal_attention import ReciprocalAttention
from reciprocal_attention.bench import _versions, sdpa_context


def per_call_ms(m, x, gy, n=30):
    for _ in range(5):
        m(x).backward(gy)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        m(x).backward(gy)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


res = {"versions": _versions(), "unit": "ms per eager fwd+bwd (wall, synchronised), B=8 T=1024 C=768 bf16"}
x = torch.randn(8, 1024, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
gy = torch.randn_like(x)
with sdpa_context("cudnn"):
    for name, preset, backend in (("baseline", "standard", "sdpa"), ("ra_fast", "ra", "sdpa"),
                                  ("channel_bias", "ra_disc_channel", "sdpa"), ("triton_bias", "ra_disc", "triton")):
        m = ReciprocalAttention.from_preset(preset, n_embd=768, n_head=12, backend=backend).cuda().bfloat16()
        res[name] = per_call_ms(m, x, gy)
        if name in ("ra_fast", "triton_bias"):
            direct = (kfold.eager_launch, kflash.eager_launch)
            kfold.eager_launch = kflash.eager_launch = lambda *t: False  # always wrap_triton (the old path)
            res[name + " (wrap_triton)"] = per_call_ms(m, x, gy)
            kfold.eager_launch, kflash.eager_launch = direct
print(json.dumps(res, indent=1))
with open(sys.argv[1], "w") as fh:
    json.dump(res, fh, indent=1)
