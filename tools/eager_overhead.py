"""Eager (host-bound) cost of the attention block (dev aid): wall ms per call, CUDA-synchronised, one card.

B=8 T=1024 C=768 bf16, cuDNN SDPA. Per arm two calls:
- ``fwd+bwd``: repeated calls with unchanged parameters (the RA fold cache hits: no fold forward kernel);
- ``step``: fwd+bwd + an SGD step and zero_grad each call (the fold is rebuilt every call, as in training).
Eager timings on the H100 machine drift by tens of percent within minutes, so the arms are interleaved: every
round times each (arm, call) for ``--inner`` calls, and the JSON gives the median and min over rounds and the
median ratio to the baseline. RA arms are also timed with Triton's own launch path
(``ops.settings.direct_launch = False``) to show what the direct launches save.
Usage: python tools/eager_overhead.py OUT_JSON [--rounds 15] [--inner 20] [--cprofile]
"""
import argparse
import json
import statistics
import time

import torch

from reciprocal_attention import ReciprocalAttention
from reciprocal_attention.lab.timing import machine_versions, sdpa_context
from reciprocal_attention.ops import settings

ARMS = (("baseline", "standard", "sdpa", True), ("ra_fast", "ra", "sdpa", True),
        ("ra_fast (JITFunction.run)", "ra", "sdpa", False), ("channel_bias", "ra_disc_channel", "sdpa", True),
        ("channel_bias (JITFunction.run)", "ra_disc_channel", "sdpa", False),
        ("triton_bias", "ra_disc", "triton", True))


def calls(m, x, gy):
    opt = torch.optim.SGD(m.parameters(), lr=1e-6)

    def fwd_bwd():
        m(x).backward(gy)

    def step():
        m(x).backward(gy)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"fwd+bwd": fwd_bwd, "step": step}


def timed(fn, direct: bool, n: int) -> float:
    settings.direct_launch = direct
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    settings.direct_launch = True
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--cprofile", action="store_true", help="also write a cProfile of 50 RA steps beside the JSON")
    a = ap.parse_args()
    x = torch.randn(8, 1024, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    res = {"versions": machine_versions(), "unit": "ms per eager call (wall, synchronised), B=8 T=1024 C=768 bf16, cuDNN",
           "rounds": a.rounds, "inner": a.inner, "arms": {}}
    with sdpa_context("cudnn"):
        fns = {}
        for name, preset, backend, direct in ARMS:
            m = ReciprocalAttention.from_preset(preset, n_embd=768, n_head=12, backend=backend).cuda().bfloat16()
            for call, fn in calls(m, x, gy).items():
                for _ in range(5):  # warm-up: compiles, autotunes, allocates
                    fn()
                fns[(name, call)] = (fn, direct)
        times = {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, (fn, direct) in fns.items():
                times[k].append(timed(fn, direct, a.inner))
        for (name, call), ts in times.items():
            base = times[("baseline", call)]
            res["arms"].setdefault(name, {})[call] = {
                "ms_median": statistics.median(ts), "ms_min": min(ts),
                "ratio_median": statistics.median(t / b for t, b in zip(ts, base))}
        if a.cprofile:
            import cProfile
            import pstats

            fn, _ = fns[("ra_fast", "step")]
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            pr.disable()
            pr.dump_stats(a.out.replace(".json", "") + ".prof")
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    for name, v in res["arms"].items():
        print(f"{name:32s}", "  ".join(f"{c}: {r['ms_median']:.3f} ms ({r['ratio_median']:.2f}x)"
                                       for c, r in v.items()))
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
