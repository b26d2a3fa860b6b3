"""Tiny driver for an ncu look at the fused fold kernels (dev aid): fold fwd+bwd at GPT-2 small, bf16 params."""
import torch
from reciprocal_attention import ReciprocalAttention
m = ReciprocalAttention.from_preset("ra", n_embd=768, n_head=12).cuda().to(torch.bfloat16)
x = torch.randn(8, 1024, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
for _ in range(3):
    m(x).backward(torch.randn_like(x))
torch.cuda.synchronize()
