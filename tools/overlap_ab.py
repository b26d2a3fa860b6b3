"""A/B of the fold backward's side-stream overlap (ops/folded_linear.py) and of the one-node eager path (dev aid).

GPT-2 small block (C=768, H=12), bf16, B*T = 8192, ``ra`` preset (same_flop, fast path) against the ``standard``
block, each on the same SDPA backend. Arms, all in one process and timed in alternating rounds (ratio = median of
per-round ratios to the baseline timed in the same round):
- graph replays of fwd+bwd and step: overlap never / side stream at priority -1 / at priority 0;
- eager fwd+bwd and step: the one-node path (``_qkv``) and the two-node path it replaced (``folded_weight`` +
  ``F.linear``).
Also records a kernel trace of one graph replay (``--trace``) to show whether the fold backward ran beside the GEMM.
Usage: python tools/overlap_ab.py OUT_JSON [--T 1024 4096] [--rounds 9] [--inner 20] [--trace]
       [--passes fwd+bwd step step0] [--memory]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from reciprocal_attention import ReciprocalAttention
from reciprocal_attention.lab import timing
from reciprocal_attention.lab.timing import Timer, machine_versions, sdpa_context, warm_workspaces
from reciprocal_attention.ops import settings


def two_node_qkv(self, x2d, out_dtype):
    """The path before the folded-linear node: the fold's own autograd Function, then F.linear."""
    wf, bf = self.folded_weight(out_dtype=out_dtype)
    return F.linear(x2d, wf, bf)


def build(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ReciprocalAttention.from_preset(preset, n_embd=768, n_head=12, block_size=8192, backend="sdpa").to(
        device="cuda", dtype=torch.bfloat16).train()


def make_step(module: torch.nn.Module, x: torch.Tensor, pass_: str):
    """``timing.make_step``, plus ``step0``: a step that ends in ``zero_grad(set_to_none=True)`` (the usual training
    loop: gradients are stolen by AccumulateGrad instead of added into existing ones)."""
    if pass_ != "step0":
        return timing.make_step(module, x, pass_)
    gy = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    xg = x.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True, capturable=True)

    def step() -> None:
        module(xg).backward(gy)
        opt.step()
        opt.zero_grad(set_to_none=True)
        xg.grad = None
    return step


def graphed(timer: Timer, preset: str, x: torch.Tensor, pass_: str, overlap: str, priority: int):
    settings.fold_overlap, settings.fold_overlap_priority = overlap, priority
    try:
        fn = make_step(build(preset), x, pass_)
        return timer.graphed(fn)  # the replay holds fn (the module, its input and gradient: the graph's memory)
    finally:
        settings.fold_overlap, settings.fold_overlap_priority = "capture", -1


def peaks(x: torch.Tensor) -> dict:
    """Peak memory of a steady-state eager fwd+bwd (as ``ra bench`` measures it) for the baseline and both RA paths,
    and what the fold cache holds between calls."""
    out = {}
    for name in ("baseline", "ra, one node", "ra, two nodes"):
        m = build("standard" if name == "baseline" else "ra")
        if name == "ra, two nodes":
            m._qkv = two_node_qkv.__get__(m)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        fn = make_step(m, x, "fwd+bwd")
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        cache = getattr(m, "_fold_cache", None)
        out[name] = {"peak_bytes": torch.cuda.max_memory_allocated() - base,
                     "cache_bytes": sum(t.numel() * t.element_size() for t in (cache or ())[1:] if t is not None)}
        print(f"peak {name:14s} {out[name]['peak_bytes'] / 2**20:8.2f} MiB (fold cache "
              f"{out[name]['cache_bytes'] / 2**20:.2f} MiB)", flush=True)
        del m, fn
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--sdpa", nargs="+", default=["cudnn", "flash"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--passes", nargs="+", default=["fwd+bwd", "step", "step0"])
    ap.add_argument("--memory", action="store_true", help="also the peak memory of eager fwd+bwd at each T")
    a = ap.parse_args()
    dev = torch.device("cuda")
    warm_workspaces(dev)
    timer = Timer(dev, warmup=3, repeats=1, inner=a.inner)
    results = {"versions": machine_versions(), "unit": "ms per call; ratio = median over rounds of arm/baseline",
               "rows": []}
    for sdpa in a.sdpa:
        for T in a.T:
            B = 8192 // T
            x = torch.randn(B, T, 768, device=dev, dtype=torch.bfloat16)
            if a.memory and sdpa == a.sdpa[0]:
                with sdpa_context(sdpa):
                    results.setdefault("peak_memory", {})[f"{sdpa} T={T}"] = peaks(x)
            with sdpa_context(sdpa):
                for pass_ in a.passes:
                    arms = {"baseline graph": graphed(timer, "standard", x, pass_, "never", 0),
                            "ra graph, no overlap": graphed(timer, "ra", x, pass_, "never", 0),
                            "ra graph, overlap prio -1": graphed(timer, "ra", x, pass_, "capture", -1),
                            "ra graph, overlap prio 0": graphed(timer, "ra", x, pass_, "capture", 0)}
                    eager = {"baseline eager": make_step(build("standard"), x, pass_),
                             "ra eager, one node": make_step(build("ra"), x, pass_)}
                    old = build("ra")
                    old._qkv = two_node_qkv.__get__(old)
                    eager["ra eager, two nodes"] = make_step(old, x, pass_)
                    for fn in list(arms.values()) + list(eager.values()):
                        for _ in range(3):
                            fn()
                    torch.cuda.synchronize()
                    times = {k: [] for k in list(arms) + list(eager)}
                    for r in range(a.rounds):
                        order = list(times) if r % 2 == 0 else list(reversed(times))
                        for k in order:
                            times[k].append(timer._block(arms.get(k) or eager[k]))
                    for k, ts in times.items():
                        base = times["baseline graph" if "graph" in k else "baseline eager"]
                        row = {"sdpa": sdpa, "T": T, "B": B, "pass": pass_, "arm": k,
                               "ms_median": statistics.median(ts), "ms_min": min(ts),
                               "ratio": statistics.median(t / b for t, b in zip(ts, base))}
                        results["rows"].append(row)
                        print(f"{sdpa:5s} T={T:5d} {pass_:8s} {k:28s} {row['ms_median']:.4f} ms  {row['ratio']:.4f}x",
                              flush=True)
                    if a.trace and T == a.T[0] and pass_ == "fwd+bwd" and sdpa == a.sdpa[0]:
                        results["trace"] = {k: trace(arms[k]) for k in ("baseline graph", "ra graph, no overlap",
                                                                         "ra graph, overlap prio -1")}
                    del arms, eager, old
                    torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


def trace(replay) -> list[dict]:
    """Kernel start/end (us from the first kernel) of one graph replay."""
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not evs:
        return []
    t0 = min(e.time_range.start for e in evs)
    rows = sorted(({"name": e.name[:90], "start_us": e.time_range.start - t0, "end_us": e.time_range.end - t0}
                   for e in evs), key=lambda r: r["start_us"])
    print(f"  trace: {len(rows)} kernels, {rows[-1]['end_us']:.1f} us from first start to last end")
    for r in rows:
        print(f"  {r['start_us']:9.1f} {r['end_us']:9.1f} {r['end_us'] - r['start_us']:7.1f}  {r['name']}")
    return rows


if __name__ == "__main__":
    main()
