"""Back from RA to plain ``GPT2Attention`` wherever the wrapped function *is* standard attention."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from transformers.models.gpt2 import modeling_gpt2 as _gpt2

from .. import fold as _fold
from ..fold import gate_sides, routed_heads
from .modeling import GPT2ReciprocalAttention


def _check_discoverability_is_noop(ra, name: str) -> None:
    """``ValueError`` unless the discoverability bias is a softmax no-op in every head."""
    f64 = torch.float64
    if ra.discoverability == "positional":
        c = ra.w_disc.to(f64).view(-1, 1) * ra.d_bias.to(f64)
        bad = (c != c[:, :1]).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{name}: positional discoverability is live in heads {bad} (w_disc * d_bias "
                             f"varies along positions); unconvert needs d_bias constant per head or w_disc == 0")
    elif ra.discoverability == "content":
        live = ((ra.w_disc.to(f64).view(-1, 1) * ra.u.to(f64)) != 0).any(dim=1).nonzero().flatten().tolist()
        if live:
            raise ValueError(f"{name}: content discoverability is live in heads {live} (w_disc * u != 0); "
                             f"unconvert needs w_disc == 0 or u == 0 per head")


def _standard_qkv(ra, name: str) -> tuple[Tensor, Tensor]:
    """The float64 ``c_attn`` weight ``[3C, C]`` and bias of plain attention computing ``ra``'s logits, or
    ``ValueError`` naming the heads whose reciprocal term is live."""
    H, D, C = ra.n_head, ra.head_dim, ra.n_embd
    f64 = torch.float64
    Wa = ra.c_attn.weight.to(f64)
    ba = ra.c_attn.bias.to(f64) if ra.c_attn.bias is not None else Wa.new_zeros(3 * C)  # bias-free: zero
    if ra.variant == "standard":
        Wn, bn = Wa, ba
    else:
        qs, ks = (t.to(f64) for t in gate_sides(ra.w_std, ra.gates))
        qr, kr = (t.to(f64) for t in gate_sides(ra.w_rec, ra.gates))
        routed = routed_heads(ra.w_rec, ra.routing_threshold)
        if ra.variant in _fold.FOLDED_VARIANTS:
            Wf, bf = _fold.fold_qkv_weight(Wa, ba, ra.W_recip.to(f64), qs, ks, qr, kr, routed, H, ra.variant)
            Dp = _fold.folded_width(ra.variant, D, ra.rank)
        else:  # full: [qs q, qr k] . [ks k, kr q]; exact as standard where qr * kr == 0 (or routed)
            Dp = 2 * D
            Wq, Wk = Wa[:C].view(H, D, C), Wa[C:2 * C].view(H, D, C)
            bq, bk = ba[:C].view(H, D), ba[C:2 * C].view(H, D)
            qb = qr if routed is None else torch.where(routed, torch.zeros_like(qr), qr)

            def cat(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
                n = a.dim()
                return torch.cat([sa.view(-1, *[1] * (n - 1)) * a, sb.view(-1, *[1] * (n - 1)) * b], dim=1)

            Wf = torch.cat([cat(Wq, Wk, qs, qb).flatten(0, 1), cat(Wk, Wq, ks, kr).flatten(0, 1), Wa[2 * C:]])
            bf = torch.cat([cat(bq, bk, qs, qb).flatten(0, 1), cat(bk, bq, ks, kr).flatten(0, 1), ba[2 * C:]])
        if Dp != D:  # drop the extra features per head where one side of them is exactly zero
            fq = torch.cat([Wf[:H * Dp].view(H, Dp, C), bf[:H * Dp].view(H, Dp, 1)], dim=2)
            fk = torch.cat([Wf[H * Dp:2 * H * Dp].view(H, Dp, C), bf[H * Dp:2 * H * Dp].view(H, Dp, 1)], dim=2)
            dead = (fq[:, D:] == 0).flatten(1).all(dim=1) | (fk[:, D:] == 0).flatten(1).all(dim=1)
            live = (~dead).nonzero().flatten().tolist()
            if live:
                raise ValueError(
                    f"{name}: the reciprocal term is live in heads {live} (w_rec = "
                    f"{[round(float(ra.w_rec[h]), 6) for h in live]}): variant {ra.variant!r} is then wider "
                    f"than standard attention. unconvert needs w_rec == 0 (or W_recip == 0, or the head routed)")
            Wn = torch.cat([fq[:, :D, :C].reshape(C, C), fk[:, :D, :C].reshape(C, C), Wf[2 * H * Dp:]])
            bn = torch.cat([fq[:, :D, C].reshape(C), fk[:, :D, C].reshape(C), bf[2 * H * Dp:]])
        else:
            Wn, bn = Wf, bf
    return Wn, bn


@torch.no_grad()
def gpt2_attention_from(wrapper: GPT2ReciprocalAttention) -> nn.Module:
    """A plain ``GPT2Attention`` computing ``wrapper``'s function, or ``ValueError`` when none exists.

    Exact cases: ``standard``; ``output_gate`` (``2 sigmoid(g_h)`` folded into ``c_proj``'s columns);
    ``same_flop`` with any gates/routing (its fold is a width-``D`` Q/K pair: RA-SPEC 2, "enlarges the
    function class: no"); ``low_rank``/``full`` where each head's reciprocal term is zero (``w_rec`` gives a
    zero Q- or K-side factor, ``W_recip == 0``, or the head is routed), with ``w_std`` folded into Q/K.
    Discoverability must be a softmax no-op: ``w_disc * d_bias`` constant along positions per head
    (positional), ``w_disc * u == 0`` per head (content).
    """
    ra = wrapper.ra
    name = f"layer {wrapper.layer_idx} (transformer.h.{wrapper.layer_idx}.attn)"
    _check_discoverability_is_noop(ra, name)
    Wn, bn = _standard_qkv(ra, name)
    f64, D = torch.float64, ra.head_dim
    Wp = ra.c_proj.weight.to(f64)
    if ra.output_gate:
        g = (2.0 * torch.sigmoid(ra.out_gate.to(f64))).repeat_interleave(D)  # per input column of c_proj
        Wp = Wp * g.view(1, -1)
    with torch.random.fork_rng(devices=[]):  # Conv1D's init must not consume the caller's RNG stream
        attn = _gpt2.GPT2Attention(wrapper.config, layer_idx=wrapper.layer_idx)
    ref = ra.c_attn.weight
    attn.to(device=ref.device, dtype=ref.dtype)
    attn.c_attn.weight.copy_(Wn.t())
    attn.c_attn.bias.copy_(bn)
    attn.c_proj.weight.copy_(Wp.t())
    if ra.c_proj.bias is not None:
        attn.c_proj.bias.copy_(ra.c_proj.bias)
    else:
        attn.c_proj.bias.zero_()
    attn.train(wrapper.training)
    return attn
