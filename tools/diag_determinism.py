"""Dev aid: which part of ra_disc_channel's eager fwd+bwd differs between two identical calls (GPU)."""
import torch

from reciprocal_attention import ReciprocalAttention
from reciprocal_attention import plan as attention_plan
from reciprocal_attention.lab.timing import sdpa_context
from reciprocal_attention.ops import settings


def make(preset):
    torch.manual_seed(5)
    m = ReciprocalAttention.from_preset(preset, n_embd=768, n_head=12, block_size=1024).cuda()
    with torch.no_grad():
        if hasattr(m, "d_bias"):
            m.d_bias.normal_(0.0, 0.5)
    return m.to(torch.bfloat16)


x = torch.randn(4, 1000, 768, device="cuda", dtype=torch.bfloat16)
g = torch.randn_like(x)


def run(m, invalidate=False):
    if invalidate:
        m.invalidate_cache()
    m.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    y = m(xx)
    y.backward(g)
    return {"y": y.detach(), "dx": xx.grad, **{n: p.grad.clone() for n, p in m.named_parameters()}}


def diff(a, b):
    return {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}


for sdpa in ("cudnn", "flash"):
    with sdpa_context(sdpa):
        for preset in ("standard", "ra", "ra_disc_channel"):
            for direct in (True, False):
                for inval in (False, True):
                    settings.direct_launch = direct
                    m = make(preset)
                    r1, r2, r3 = run(m, inval), run(m, inval), run(m, inval)
                    print(f"{sdpa:6s} {preset:16s} direct={direct!s:5s} invalidate={inval!s:5s} "
                          f"1v2 {diff(r1, r2) or 'equal'}  2v3 {diff(r2, r3) or 'equal'}")
settings.direct_launch = True
with sdpa_context("cudnn"):
    m = make("ra_disc_channel")
    r1 = run(m)
    orig = attention_plan.fused_channel_usable
    attention_plan.fused_channel_usable = lambda device: False
    m.cuda()  # the plan is chosen on construction and .to(): re-plan without the fused channel
    r2, r3 = run(m), run(m)
    attention_plan.fused_channel_usable = orig
    print("torch channel form: 2v3", diff(r2, r3) or "equal")
