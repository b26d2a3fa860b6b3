"""Host overhead of an eager attention block (dev aid): wall ms per call, CUDA-synchronised, one card, one process.

Rows, B=8 T=1024 C=768 bf16, cuDNN SDPA:
- ``fwd+bwd``: repeated calls with unchanged parameters (the RA fold cache hits: no fold forward kernel);
- ``step``: fwd+bwd + an SGD step each call (the fold is rebuilt every call, as in training);
- the fused fold alone (``fused_fold_gated`` forward + backward; forward without grad), to split the RA overhead
  into the fold's own calls and the rest.
A torch.profiler table of the RA ``step`` call (host time by op) is written beside the JSON.
Usage: python scripts/eager_overhead.py OUT_JSON
"""
import json
import sys
import time

import torch

import reciprocal_attention.kernels.fold as kfold
from reciprocal_attention.kernels import launch
from reciprocal_attention import ReciprocalAttention
from reciprocal_attention.bench import _versions, sdpa_context


def per_call_ms(fn, n=40):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def block_calls(m, x, gy):
    opt = torch.optim.SGD(m.parameters(), lr=1e-6)

    def fwd_bwd():
        m(x).backward(gy)

    def step():
        m(x).backward(gy)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fwd_bwd, step


def cprofile_text(fn, n=50) -> str:
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(35)
    return buf.getvalue()


def main(out: str) -> None:
    res = {"versions": _versions(), "unit": "ms per eager call (wall, synchronised), B=8 T=1024 C=768 bf16, cuDNN",
           "direct_launch": "RA rows with kernels.launch.DIRECT on (default) and off (JITFunction.run)"}
    x = torch.randn(8, 1024, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    stem = out.replace(".json", "")
    profiles = []
    with sdpa_context("cudnn"):
        for name, preset, backend in (("baseline", "standard", "sdpa"), ("ra_fast", "ra", "sdpa"),
                                      ("channel_bias", "ra_disc_channel", "sdpa"),
                                      ("triton_bias", "ra_disc", "triton")):
            m = ReciprocalAttention.from_preset(preset, n_embd=768, n_head=12, backend=backend).cuda().bfloat16()
            fwd_bwd, step = block_calls(m, x, gy)
            res[name] = {"fwd+bwd": per_call_ms(fwd_bwd), "step": per_call_ms(step)}
            if name in ("ra_fast", "channel_bias"):
                launch.DIRECT = False
                res[name + " (JITFunction.run)"] = {"fwd+bwd": per_call_ms(fwd_bwd), "step": per_call_ms(step)}
                launch.DIRECT = True
            if name in ("baseline", "ra_fast"):
                profiles.append(f"===== {name} step, cProfile of 50 calls\n" + cprofile_text(step))
            if name == "ra_fast":
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
                with prof:
                    for _ in range(10):
                        step()
                    torch.cuda.synchronize()
                with open(stem + "_profile.txt", "w") as fh:
                    fh.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
                p = [m.c_attn.weight, m.W_recip, m.w_std, m.w_rec]

                def fold():
                    w, _ = kfold.fused_fold_gated(m.c_attn.weight, m.c_attn.bias, m.W_recip, m.w_std, m.w_rec, 12,
                                                  "same_flop")
                    w.backward(torch.ones_like(w))

                res["fold fwd+bwd alone"] = per_call_ms(fold)
                with torch.no_grad():
                    res["fold fwd alone (no grad)"] = per_call_ms(
                        lambda: kfold.fused_fold_gated(*p[:1], m.c_attn.bias, *p[1:], 12, "same_flop"))
    with open(stem + "_cprofile.txt", "w") as fh:
        fh.write("\n".join(profiles))
    for k, v in res.items():
        print(k, v)
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
