"""RA Ultimate v2 exactly as the seed ran it: the benchmark's "seed as it ran" row and the seed-fidelity test.

Not a fast path and not part of the library: it synchronises the host (``.item()``/``nonzero``) to gather routed
heads into packs. The library's ``seed`` preset computes the same function without host syncs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def seed_packed_attention(
    Q: Tensor, K: Tensor, V: Tensor, w_std: Tensor, w_rec: Tensor, W_recip: Tensor, threshold: float = 0.1,
) -> Tensor:
    """RA Ultimate v2 exactly as the seed ran it: activation fold with routed head packs, host-synchronising.

    Heads are gathered into an RA pack and a standard pack by boolean indexing (``.item()``/``nonzero`` sync the
    host), each pack runs one SDPA, and the results are scattered back. Seed gates (``sqrt(clamp_min(w, 1e-8))``
    on both sides). Discoverability off, as the seed's Flash path could take no mask. Kept for the benchmark's
    "seed as it ran" row and as a fidelity check; use the module for anything else.
    """
    B, H, T, D = Q.shape
    R = W_recip.shape[1]
    ds = D - R
    use_ra = w_rec > threshold
    n_ra = int(use_ra.sum().item())
    if n_ra == 0:
        s = w_std.clamp_min(1e-8).sqrt().view(1, -1, 1, 1)
        return F.scaled_dot_product_attention(Q * s, K * s, V, is_causal=True)
    QW, KW = Q @ W_recip, K @ W_recip
    idx_ra = torch.nonzero(use_ra, as_tuple=False).squeeze(1)
    idx_bl = torch.nonzero(~use_ra, as_tuple=False).squeeze(1)
    out = torch.empty_like(Q)
    if idx_bl.numel() > 0:
        s = w_std[idx_bl].clamp_min(1e-8).sqrt().view(1, -1, 1, 1)
        out[:, idx_bl] = F.scaled_dot_product_attention(Q[:, idx_bl] * s, K[:, idx_bl] * s, V[:, idx_bl],
                                                         is_causal=True)
    s = w_std[idx_ra].clamp_min(1e-8).sqrt().view(1, -1, 1, 1)
    r = w_rec[idx_ra].clamp_min(1e-8).sqrt().view(1, -1, 1, 1)
    q_aug = torch.cat([s * Q[:, idx_ra, :, :ds], r * KW[:, idx_ra]], dim=-1).contiguous()
    k_aug = torch.cat([s * K[:, idx_ra, :, :ds], r * QW[:, idx_ra]], dim=-1).contiguous()
    out[:, idx_ra] = F.scaled_dot_product_attention(q_aug, k_aug, V[:, idx_ra], is_causal=True)
    return out
