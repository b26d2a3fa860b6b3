"""Folds: how RA runs on a standard attention kernel (RA-SPEC section 3).

Every function here is plain PyTorch: readable, exact, differentiable. Fused GPU versions live in
``reciprocal_attention.ops`` and are tested against these.

Gate sides: a term gated by ``w`` carries ``q_side`` on its Q features and ``k_side`` on its K features
(:func:`gate_sides`). Below, ``qs, ks`` are the sides of ``w_std`` and ``qr, kr`` those of ``w_rec``,
each of shape ``[H]``; ``routed`` is a boolean ``[H]`` mask of heads routed to standard attention, or None.

* Activation fold (3.1): ``Q~ = [qs Q[:Ds], qr K W]``, ``K~ = [ks K[:Ds], kr Q W]``; then one causal SDPA with
  ``scale = 1/sqrt(D)``. ``Q~_i . K~_j = a q_i[:Ds].k_j[:Ds] + b (k_i W).(q_j W)``.
* Weight-space fold (3.2): ``Q~`` and ``K~`` are affine in ``x``, so the fold moves into ``c_attn``'s weight and
  bias, and one GEMM emits ``[Q~ | K~ | V]`` directly.
* Channel fold (3.3): one extra Q/K feature carries a column bias exactly.
* ``full`` via SDPA (3.4): ``[Q, K] . [K, Q]`` gives ``S + S^T``; V is zero-padded to 2D.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference import GATES, SEED_GATE_FLOOR, VARIANTS, check_choice

FOLDED_VARIANTS = ("low_rank", "same_flop")
__all__ = ["FOLDED_VARIANTS", "GATES", "VARIANTS", "check_choice"]  # re-exported for the layers above


def gate_sides(w: Tensor, gates: str) -> tuple[Tensor, Tensor]:
    """Per-head factors ``(q_side, k_side)`` that a gate parameter ``w`` puts on the Q and K sides of a term.

    ``seed``: ``sqrt(clamp_min(w, 1e-8))`` on both sides (the seed's form; zero gradient for ``w <= 1e-8``).
    ``signed``: ``w`` on the Q side, 1 on the K side (defined for any sign, no dead zone).
    Either way ``q_side * k_side == w`` for ``w > 0``.
    """
    check_choice("gates", gates, GATES)
    if gates == "seed":
        s = w.clamp_min(SEED_GATE_FLOOR).sqrt()
        return s, s
    return w, torch.ones_like(w)


def routed_heads(w_rec: Tensor, routing_threshold: float | None) -> Tensor | None:
    """Boolean ``[H]`` mask of heads routed to standard attention (``w_rec <= threshold``), or None when off.
    Computed on the device: no host synchronisation."""
    if routing_threshold is None:
        return None
    return w_rec.detach() <= routing_threshold


def positional_bias(w_disc: Tensor, d_bias: Tensor, positions: Tensor, center: bool = False) -> Tensor:
    """Positional discoverability ``c_hj = w_disc[h] * d_bias[h, j]`` at key ``positions`` ``[T]`` -> ``[H, T]``, or
    ``[B, T]`` -> ``[B, H, T]``. ``center`` subtracts the mean over the keys (the seed's softmax no-op)."""
    d = d_bias[:, positions]  # [H, T] or [H, B, T]
    if center:
        d = d - d.mean(dim=-1, keepdim=True)
    if positions.dim() == 2:
        return w_disc.view(1, -1, 1) * d.transpose(0, 1)
    return w_disc.view(-1, 1) * d


def content_bias(w_disc: Tensor, u: Tensor, k: Tensor) -> Tensor:
    """Content discoverability ``c_hj = w_disc[h] * <k_j, u_h>`` for unfolded keys ``k [B, H, T, D]`` -> ``[B, H, T]``."""
    return w_disc.view(1, -1, 1) * torch.einsum("bhtd,hd->bht", k, u)


def std_width(variant: str, D: int, R: int, bias_channel: bool = False) -> int:
    """Features of the standard term in a folded head: ``D`` for ``low_rank``, ``D - R`` for ``same_flop``
    (``D - R - 1`` with ``bias_channel``: the head's last feature is reserved for the column bias, RA-SPEC 3.3)."""
    if variant == "low_rank":
        return D
    return D - R - 1 if bias_channel else D - R


def folded_width(variant: str, D: int, R: int) -> int:
    """Width of a folded Q/K head: ``D + R`` for ``low_rank``, ``D`` for ``same_flop``."""
    return D + R if variant == "low_rank" else D


def _h(x: Tensor, ndim: int) -> Tensor:
    """``[H]`` -> shape broadcastable against a tensor whose head axis is 0 and that has ``ndim`` dims."""
    return x.view(-1, *([1] * (ndim - 1)))


def fold_head_weights(
    Wq: Tensor, Wk: Tensor, W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor, kr: Tensor,
    routed: Tensor | None, variant: str, bias_channel: bool = False, q_channel_value: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Fold per-head Q/K weights ``[H, D, ...]`` (``...`` = ``C`` for weights, empty for biases).

    Returns ``(Wq~, Wk~)`` of shape ``[H, D', ...]`` with ``D' = folded_width``:
    ``Wq~^h = [qs Wq^h[:Ds] ; qr W^T Wk^h]`` and ``Wk~^h = [ks Wk^h[:Ds] ; kr W^T Wq^h]``.
    A routed head takes ``[qs Wq^h ; 0]`` and ``[ks Wk^h ; 0]`` (full D, zero reciprocal rows for low_rank).
    ``bias_channel`` (same_flop, no routing): ``Ds = D - R - 1`` and a last row that is ``q_channel_value`` on the
    Q side (1 for the bias: the channel's ``kappa``) and zero on the K side, which :func:`add_bias_channel`
    fills after the GEMM.
    """
    H, D = Wq.shape[:2]
    R = W.shape[1]
    ds = std_width(variant, D, R, bias_channel)
    n = Wq.dim()
    rec_q = torch.einsum("dr,hd...->hr...", W, Wk)  # W^T Wk^h: [H, R, ...]
    rec_k = torch.einsum("dr,hd...->hr...", W, Wq)
    q_row = [Wq.new_full((H, 1, *Wq.shape[2:]), q_channel_value)] if bias_channel else []
    k_row = [Wk.new_zeros(H, 1, *Wk.shape[2:])] if bias_channel else []
    fq = torch.cat([_h(qs, n) * Wq[:, :ds], _h(qr, n) * rec_q.to(Wq.dtype)] + q_row, dim=1)
    fk = torch.cat([_h(ks, n) * Wk[:, :ds], _h(kr, n) * rec_k.to(Wk.dtype)] + k_row, dim=1)
    if routed is not None:
        pad = fq.shape[1] - D
        plain_q = _h(qs, n) * Wq
        plain_k = _h(ks, n) * Wk
        if pad:
            zeros = Wq.new_zeros(H, pad, *Wq.shape[2:])
            plain_q = torch.cat([plain_q, zeros], dim=1)
            plain_k = torch.cat([plain_k, zeros], dim=1)
        fq = torch.where(_h(routed, n), plain_q, fq)
        fk = torch.where(_h(routed, n), plain_k, fk)
    return fq, fk


def fold_qkv_weight(
    weight: Tensor, bias: Tensor | None, W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor, kr: Tensor,
    routed: Tensor | None, n_head: int, variant: str, bias_channel: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Weight-space fold of a ``c_attn`` weight ``[3C, C]`` (and bias ``[3C]``) into ``[2 H D' + C, C]``.

    ``F.linear(x, *fold_qkv_weight(...))`` emits ``[Q~ | K~ | V]`` per token, head-major like ``c_attn``.
    Exact, differentiable (autograd maps the folded weight's gradient back to ``weight``, ``W`` and the gates).
    """
    C = weight.shape[1]
    D = C // n_head

    def fold(t: Tensor, q_channel_value: float) -> Tensor:
        wq, wk, wv = t.split(C, dim=0)
        fq, fk = fold_head_weights(wq.reshape(n_head, D, *t.shape[1:]), wk.reshape(n_head, D, *t.shape[1:]),
                                   W, qs, ks, qr, kr, routed, variant, bias_channel, q_channel_value)
        return torch.cat([fq.flatten(0, 1), fk.flatten(0, 1), wv], dim=0)

    # with bias_channel the folded bias carries the Q channel's constant kappa = 1
    return fold(weight, 0.0), (fold(bias, 1.0) if bias is not None else None)


def activation_fold(
    q: Tensor, k: Tensor, W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor, kr: Tensor,
    routed: Tensor | None, variant: str, bias_channel: bool = False,
) -> tuple[Tensor, Tensor]:
    """Activation-space fold of ``q, k`` ``[B, H, T, D]`` into ``Q~, K~`` ``[B, H, T, D']`` (RA-SPEC 3.1).

    The same function as :func:`fold_qkv_weight` applied after the projection; kept as the readable baseline.
    """
    # Heads are axis 1 here; move them to axis 0 so fold_head_weights' per-head broadcasting applies.
    fq, fk = fold_head_weights(q.transpose(0, 1).transpose(1, 3), k.transpose(0, 1).transpose(1, 3),
                               W, qs, ks, qr, kr, routed, variant, bias_channel)
    return fq.transpose(1, 3).transpose(0, 1), fk.transpose(1, 3).transpose(0, 1)


def channel_fold(q: Tensor, k: Tensor, col_bias: Tensor, scale: float, kappa: float = 1.0,
                 multiple: int = 8) -> tuple[Tensor, Tensor]:
    """Append one feature that adds ``col_bias`` exactly to every logit (RA-SPEC 3.3).

    The Q feature is the constant ``kappa``; the K feature at key ``j`` is ``c_hj / (scale * kappa)``; so with the
    attention's ``scale`` it contributes exactly ``c_hj``. Widths are then zero-padded to a multiple of
    ``multiple`` (zero features change no logit) so every SDPA backend accepts them. ``col_bias`` is ``[H, T]`` or
    ``[B, H, T]``; its gradient flows through the K feature.
    """
    B, H, T, Dq = q.shape
    c = col_bias.to(k.dtype)
    c = c.unsqueeze(0).expand(B, H, T) if c.dim() == 2 else c
    width = math.ceil((Dq + 1) / multiple) * multiple
    extra = width - Dq - 1
    q_feat = q.new_full((B, H, T, 1), kappa)
    k_feat = (c / (scale * kappa)).unsqueeze(-1)
    pads_q = [q, q_feat] + ([q.new_zeros(B, H, T, extra)] if extra else [])
    pads_k = [k, k_feat] + ([k.new_zeros(B, H, T, extra)] if extra else [])
    return torch.cat(pads_q, dim=-1), torch.cat(pads_k, dim=-1)


def _add_channel_columns(qkv: Tensor, c_t: Tensor, q0: int, k0: int, step: int, n: int, kappa: float) -> None:
    """``qkv [B*T, N]`` in place: ``+= kappa`` on the Q channel columns (unless 0), ``+= c_t`` on the K ones."""
    T = c_t.shape[-2]
    v = qkv.view(-1, T, qkv.shape[-1])
    if kappa:  # 0: the folded bias already put kappa there
        v[..., q0:q0 + n * step:step].add_(kappa)
    v[..., k0:k0 + n * step:step].add_(c_t)


class _AddBiasChannel(torch.autograd.Function):
    """In place on the 2-D GEMM output ``[B*T, N]``: ``+= kappa`` on the Q channel columns and ``+= c_t`` on the K
    channel columns; the gradient passes through unchanged (an addition) and ``c_t``'s is the K columns' gradient.
    In place on a base tensor: the out-of-place form, or any in-place update of a view (autograd's ``CopySlices``),
    copies all of ``qkv`` (measured: four full copies, +100 us per block fwd+bwd on an H100). Eager calls only:
    traced calls take :func:`add_bias_channel_heads`."""

    @staticmethod
    def forward(ctx, qkv: Tensor, c_t: Tensor, q0: int, k0: int, step: int, n: int, kappa: float) -> Tensor:
        _add_channel_columns(qkv, c_t, q0, k0, step, n, kappa)
        ctx.mark_dirty(qkv)
        ctx.cols = (k0, step, n, c_t.shape[-2], c_t.dim() == 2)
        return qkv

    @staticmethod
    def backward(ctx, g: Tensor):
        k0, step, n, T, shared = ctx.cols
        dc = g.view(-1, T, g.shape[-1])[..., k0:k0 + n * step:step]  # [B, T, H]
        return g, (dc.sum(0) if shared else dc), None, None, None, None, None


def add_bias_channel(qkv: Tensor, col_bias: Tensor, n_head: int, width: int, scale: float,
                     kappa: float = 1.0, q_channel: bool = True) -> Tensor:
    """Fill the reserved last feature of every folded Q/K head so it adds ``col_bias`` exactly (RA-SPEC 3.3).

    ``qkv`` is the 2-D ``[B*T, 2 H width + C]`` output of the folded GEMM (rows ordered ``b, t``; a base tensor,
    not a view) whose bias-channel rows are zero (``fold_qkv_weight(..., bias_channel=True)``). The Q feature
    becomes ``kappa`` and the K feature at key ``j`` ``c_hj / (scale * kappa)``, so with the attention's ``scale``
    the channel contributes ``c_hj``: the bias at the same Q/K width, on any SDPA backend. ``col_bias``: ``[H, T]``
    or ``[B, H, T]``. ``q_channel=False`` when the GEMM's bias already wrote ``kappa`` (= 1) into the Q feature
    (``fold_qkv_weight`` does when ``c_attn`` has a bias): one strided update fewer. Modifies ``qkv`` in place
    and returns it.
    """
    if not q_channel and kappa != 1.0:
        raise ValueError(f"q_channel=False means the folded bias already holds kappa = 1; got kappa={kappa}")
    if qkv.dim() != 2 or qkv._base is not None:
        raise ValueError(f"qkv must be the 2-D [B*T, N] GEMM output itself (not a view); got shape "
                         f"{list(qkv.shape)}{' (a view)' if qkv._base is not None else ''}")
    c_t = (col_bias / (scale * kappa)).transpose(-1, -2).to(qkv.dtype)  # [T, H] or [B, T, H]
    q0 = width - 1
    return _AddBiasChannel.apply(qkv, c_t, q0, n_head * width + q0, width, n_head, kappa if q_channel else 0.0)


def add_bias_channel_heads(q: Tensor, k: Tensor, col_bias: Tensor, scale: float, kappa: float = 1.0,
                           q_channel: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`add_bias_channel` on the split heads, out of place: ``Q~, K~ [B, H, T, width]`` whose last feature
    is zero -> ``Q~`` with ``kappa`` there (``q_channel``) and ``K~`` with ``c_hj / (scale * kappa)``.

    The form for traced calls (torch.compile): inductor fuses it into one pointwise kernel over K~, a third of the
    GEMM output. An in-place update of the GEMM output is functionalised there into a rebuild of all of ``qkv``
    (+269 us per GPT-2 small step at 8 x 1024 on an H100), and with an opaque op that mutates it the compiled step
    measured 1.463x / 1.117x the baseline's at 8 x 1024 / 2 x 4096 (this form: 1.046x / 1.021x).
    ``col_bias``: ``[H, T]`` or ``[B, H, T]``; rounded to K~'s dtype once, as :func:`add_bias_channel` does.
    The bias is broadcast over the batch before it is padded to the head width, so the backward takes the reserved
    feature's gradient first and sums that over the batch: padded first, the gradient's sum over the batch read all
    of dK~ and wrote ``[H, T, width]`` (16 us per layer of a GPT-2 small step at 8 x 1024 on an H100).
    """
    if q.shape[-1] != k.shape[-1] or q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, T, width] with one width; got {list(q.shape)} and {list(k.shape)}")
    width = k.shape[-1]
    c = (col_bias / (scale * kappa)).to(k.dtype).unsqueeze(-1).expand(*k.shape[:-1], 1)
    k = k + torch.nn.functional.pad(c, (width - 1, 0))
    if q_channel:
        q = q + torch.nn.functional.pad(q.new_full((1,), kappa), (width - 1, 0))
    return q, k


def full_qk(q: Tensor, k: Tensor, qa: Tensor, ka: Tensor, qb: Tensor, kb: Tensor,
            routed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``full`` variant as one attention of width 2D: ``Q' = [qa q, qb k]``, ``K' = [ka k, kb q]``.

    ``Q'_i . K'_j = (qa ka) q_i.k_j + (qb kb) k_i.q_j = a S_ij + b S_ji``. Pass ``scale = 1/sqrt(D)`` explicitly.
    A routed head keeps only the standard term (its ``qb`` is zeroed).
    """
    if routed is not None:
        qb = torch.where(routed, torch.zeros_like(qb), qb)
    def ph(x: Tensor) -> Tensor:
        return x.view(1, -1, 1, 1)

    return (torch.cat([ph(qa) * q, ph(qb) * k], dim=-1), torch.cat([ph(ka) * k, ph(kb) * q], dim=-1))
