"""Host (Python + dispatch) cost of an eager block step on the CPU, with the Triton launches stubbed out (dev aid).

The GPU machine's eager numbers are host-bound and drift; this replica needs no GPU and reproduces their ratio
(~1.5x for the RA fast path on both). Tiny shapes (B=1, T=4, C=64, fp32) keep the CPU arithmetic
negligible, the fused-fold path is forced on, and every Triton launch is a no-op: what is timed is the work the
host does per call. Arms are interleaved over rounds; prints median us per step and the median ratio.
Usage: python tools/host_overhead_cpu.py [--rounds 15] [--inner 300]
"""
import argparse
import statistics
import time

import torch

import reciprocal_attention.ops.fold as kfold
from reciprocal_attention import ReciprocalAttention
from reciprocal_attention import plan as attention_plan


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=300)
    a = ap.parse_args()
    kfold.INTERPRET = True  # CPU tensors pass the fold's device check; eager calls take the op's Function
    kfold.launcher = lambda kernel, *t: _NoLaunch()  # every launch a no-op
    attention_plan.fused_fold_usable = lambda device, dtype: True
    torch.set_num_threads(1)
    # the stubbed kernels leave their outputs uninitialised; denormals in them would slow the CPU GEMMs ~5x
    torch.set_flush_denormal(True)
    x = torch.randn(1, 4, 64, requires_grad=True)
    gy = torch.randn_like(x)
    steps = {}
    for name, preset, kw in (("baseline", "standard", {}), ("ra_fast", "ra", {"rank": 8})):
        m = ReciprocalAttention.from_preset(preset, n_embd=64, n_head=4, backend="sdpa", **kw)
        opt = torch.optim.SGD(m.parameters(), lr=1e-6)

        def step(m=m, opt=opt):
            m(x).backward(gy)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(50):
            step()
        steps[name] = step
    times = {k: [] for k in steps}
    for _ in range(a.rounds):
        for k, fn in steps.items():
            t = time.perf_counter()
            for _ in range(a.inner):
                fn()
            times[k].append((time.perf_counter() - t) / a.inner * 1e6)
    for k, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times["baseline"]))
        print(f"{k:10s} {statistics.median(ts):7.1f} us per step  ({ratio:.3f}x)")


if __name__ == "__main__":
    main()
