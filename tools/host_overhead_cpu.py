"""Host (Python + dispatch) cost of an eager step on the CPU, with the Triton launches stubbed out (dev aid).

The GPU machine's eager numbers are host-bound and drift; this replica needs no GPU and reproduces their ratio
(~1.5x for the RA fast path's block on both). Tiny shapes (fp32, C=64) keep the CPU arithmetic negligible, the
fused fold and fused bias-channel paths are forced on, and every Triton launch is a no-op: what is timed is the
work the host does per call. Arms are interleaved over rounds; prints median us per step, the difference to the
baseline and the median ratio.

* default: one attention block, fwd+bwd+SGD step (B=1, T=4), the baseline against the RA fast path;
* ``--model``: the whole 12-layer GPT, fwd+bwd+fused AdamW+``zero_grad`` (B=1, T=8), ``standard`` against
  ``--presets`` (default ``ra,ra_disc_channel``): what an eager training step adds per step on the host;
  ``--profile PRESET`` prints the functions whose own host time is largest for that preset (cProfile).

Usage: python tools/host_overhead_cpu.py [--model [--presets ra,ra_disc_channel] [--profile PRESET]]
                                         [--rounds 15] [--inner N]
"""
import argparse
import cProfile
import pstats
import statistics
import time

import torch

import reciprocal_attention.ops.channel as kchannel
import reciprocal_attention.ops.fold as kfold
from reciprocal_attention import ReciprocalAttention
from reciprocal_attention import plan as attention_plan
from reciprocal_attention.model import GPT, GPTConfig


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def _stub_launches() -> None:
    """Every Triton launch a no-op; CPU tensors take the fused paths (the ops' device checks pass as under the
    interpreter, and the plan picks the fused fold and channel)."""
    for mod in (kfold, kchannel):
        mod.INTERPRET = True
        mod.launcher = lambda kernel, *t: _NoLaunch()
    attention_plan.fused_fold_usable = lambda device, dtype: True
    attention_plan.fused_channel_usable = lambda device: True


def _block_steps() -> dict:
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

        steps[name] = step
    return steps


def _model_steps(presets: list[str]) -> dict:
    idx = torch.randint(0, 96, (1, 8))
    steps = {}
    for preset in ["standard"] + presets:
        cfg = GPTConfig.from_preset("gpt2", attn=preset, n_head=4, n_embd=64, vocab_size=96, block_size=64)
        model = GPT(cfg, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

        def step(model=model, opt=opt):
            model(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps["baseline" if preset == "standard" else preset] = step
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="store_true", help="the whole 12-layer GPT's training step instead of a block")
    ap.add_argument("--presets", default="ra,ra_disc_channel", help="with --model: RA presets against standard")
    ap.add_argument("--profile", default=None, metavar="PRESET", help="with --model: cProfile one preset's steps")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=None, help="steps per round (default: 300 block, 20 model)")
    a = ap.parse_args()
    _stub_launches()
    torch.set_num_threads(1)
    # the stubbed kernels leave their outputs uninitialised; denormals in them would slow the CPU GEMMs ~5x
    torch.set_flush_denormal(True)
    steps = _model_steps(a.presets.split(",")) if a.model else _block_steps()
    inner = a.inner or (20 if a.model else 300)
    for fn in steps.values():
        for _ in range(5 if a.model else 50):
            fn()
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(inner):
            steps[a.profile]()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    times = {k: [] for k in steps}
    for _ in range(a.rounds):
        for k, fn in steps.items():
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t) / inner * 1e6)
    base = statistics.median(times["baseline"])
    for k, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times["baseline"]))
        print(f"{k:16s} {statistics.median(ts):8.1f} us per step  {statistics.median(ts) - base:+8.1f} us  "
              f"({ratio:.3f}x)")


if __name__ == "__main__":
    main()
