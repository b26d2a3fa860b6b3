"""Functional RA on ``[B, H, T, D]`` tensors, and the attention cores every path shares.

``reciprocal_attention(q, k, v, ...)`` computes the logits of :func:`reference.ra_logits` (softmax, then ``@ v``)
on a chosen backend. Inputs are checked at this boundary (dtype, device, every parameter's shape and range), so a
mistake is a named ``ValueError``/``TypeError``, never a failure deep in a kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fold as _fold
from .fold import GATES, VARIANTS, check_choice, gate_sides, routed_heads

BACKENDS = ("auto", "reference", "sdpa", "triton")
#: Head widths the fused Triton attention kernels are built for.
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale: float, dropout_p: float = 0.0, causal: bool = True,
         attn_mask: Tensor | None = None) -> Tensor:
    """SDPA that also takes a V narrower than Q/K (zero-pads V, then slices: fused backends need equal widths)."""
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=causal and attn_mask is None, scale=scale)
    return out[..., :dv]


def attend(q: Tensor, k: Tensor, v: Tensor, *, col_bias: Tensor | None, scale: float, dropout_p: float,
           triton: bool, a: Tensor | None = None, b: Tensor | None = None) -> Tensor:
    """Causal attention core on folded ``Q~, K~`` with an optional column bias: the fused Triton kernel (the bias
    and, for ``full``, the coefficients ``a, b`` of ``a S + b S^T`` inside it) or SDPA (the bias in one extra
    Q/K feature, RA-SPEC 3.3)."""
    if triton:
        if dropout_p:
            raise ValueError("backend='triton' does not implement attention dropout; use dropout=0 or 'sdpa'")
        from .ops.flash import flash_ra_attention

        return flash_ra_attention(q, k, v, scale=scale, col_bias=col_bias, a=a, b=b)
    if col_bias is not None:
        q, k = _fold.channel_fold(q, k, col_bias, scale)
    return sdpa(q, k, v, scale=scale, dropout_p=dropout_p)


def _check_gate(name: str, w: Tensor | None, H: int, like: Tensor, variant: str) -> Tensor:
    if w is None:
        raise ValueError(f"variant {variant!r} needs w_std and w_rec of shape [H] = [{H}]; {name} is missing")
    if not isinstance(w, Tensor) or w.shape != (H,):
        raise ValueError(f"{name} must have shape [H] = [{H}]; got {list(getattr(w, 'shape', [type(w).__name__]))}")
    if not w.is_floating_point() or w.device != like.device:
        raise TypeError(f"{name} must be a floating tensor on {like.device}; got {w.dtype} on {w.device}")
    return w


def check_inputs(q: Tensor, k: Tensor, v: Tensor, *, variant: str, W: Tensor | None, w_std: Tensor | None,
                 w_rec: Tensor | None, col_bias: Tensor | None, dropout_p: float, scale: float | None) -> None:
    """Validate the functional API's inputs; raise a ``ValueError``/``TypeError`` naming the parameter."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, H, T, D]; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must have shape [B, H, T, D] (v may have its own width Dv); got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    B, H, T, D = q.shape
    if T < 1:
        raise ValueError("q, k, v need at least one position (T >= 1)")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1); got {dropout_p!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive float (default 1/sqrt(D)); got {scale!r}")
    if variant != "standard":
        _check_gate("w_std", w_std, H, q, variant)
        _check_gate("w_rec", w_rec, H, q, variant)
    if variant in _fold.FOLDED_VARIANTS:
        if not isinstance(W, Tensor) or W.dim() != 2 or W.shape[0] != D:
            raise ValueError(f"variant {variant!r} needs W of shape [D, R] with D = {D}; got "
                             f"{list(W.shape) if isinstance(W, Tensor) else W!r}")
        R = W.shape[1]
        if variant == "same_flop" and not 1 <= R < D:
            raise ValueError(f"same_flop needs W of shape [D, R] with 1 <= R < D = {D}; got R = {R}")
        if R < 1:
            raise ValueError(f"W must have at least one column (R >= 1); got shape {list(W.shape)}")
        if W.device != q.device or not W.is_floating_point():
            raise TypeError(f"W must be a floating tensor on {q.device}; got {W.dtype} on {W.device}")
    if col_bias is not None:
        if not isinstance(col_bias, Tensor) or tuple(col_bias.shape) not in ((H, T), (B, H, T)):
            raise ValueError(f"col_bias must have shape [H, T] = [{H}, {T}] or [B, H, T] = [{B}, {H}, {T}]; got "
                             f"{list(getattr(col_bias, 'shape', [type(col_bias).__name__]))}")
        if col_bias.device != q.device or not col_bias.is_floating_point():
            raise TypeError(f"col_bias must be a floating tensor on {q.device}; got {col_bias.dtype} on "
                            f"{col_bias.device}")


def reciprocal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, variant: str = "same_flop", W: Tensor | None = None,
    w_std: Tensor | None = None, w_rec: Tensor | None = None, gates: str = "signed",
    routing_threshold: float | None = None, col_bias: Tensor | None = None, scale: float | None = None,
    dropout_p: float = 0.0, backend: str = "auto",
) -> Tensor:
    """Causal Reciprocal Attention on ``q, k, v`` of shape ``[B, H, T, D]`` -> ``[B, H, T, Dv]``.

    Arguments (logits as :func:`reciprocal_attention.reference.ra_logits`, RA-SPEC section 2):

    * ``variant``: ``"standard"`` | ``"full"`` (``a S + b S^T``) | ``"low_rank"`` (width ``D+R``) |
      ``"same_flop"`` (RA Ultimate v2: ``D-R`` standard + ``R`` reciprocal features).
    * ``W``: ``[D, R]``, for ``low_rank`` (``R >= 1``) and ``same_flop`` (``1 <= R < D``).
    * ``w_std``, ``w_rec``: per-head gates ``[H]``, for every variant but ``standard``.
    * ``gates``: ``"signed"`` (``w`` on the Q side; any sign) | ``"seed"`` (``sqrt(clamp_min(w, 1e-8))`` on both
      sides, the seed's form).
    * ``routing_threshold``: ``None`` or a float; heads with ``w_rec <= threshold`` use the standard logit.
    * ``col_bias``: the discoverability column bias, ``[H, T]`` or ``[B, H, T]``, added to every logit of key ``j``.
    * ``scale``: default ``1/sqrt(D)``. ``dropout_p``: in ``[0, 1)`` (SDPA backends only).
    * ``backend``: ``"auto"`` | ``"reference"`` (float64-exact oracle, ``T x T`` memory) | ``"sdpa"`` (PyTorch SDPA
      on the activation fold) | ``"triton"`` (fused kernels, CUDA).
    """
    check_choice("variant", variant, VARIANTS)
    check_choice("gates", gates, GATES)
    check_choice("backend", backend, BACKENDS)
    check_inputs(q, k, v, variant=variant, W=W, w_std=w_std, w_rec=w_rec, col_bias=col_bias, dropout_p=dropout_p,
                 scale=scale)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.shape[0] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    if backend == "reference":
        from .reference import ra_attention

        return ra_attention(q, k, v, variant=variant, W=W, w_std=w_std, w_rec=w_rec, gates=gates,
                            routing_threshold=routing_threshold, col_bias=col_bias, scale=scale)
    from .ops import INTERPRET, TRITON_AVAILABLE

    kernel_ok = TRITON_AVAILABLE and (q.is_cuda or INTERPRET) and D in TRITON_HEAD_DIMS and dropout_p == 0.0
    if variant == "standard":
        use_triton = backend == "triton" or (backend == "auto" and col_bias is not None and q.is_cuda and kernel_ok)
        return attend(q, k, v, col_bias=col_bias, scale=scale, dropout_p=dropout_p, triton=use_triton)
    qs, ks = gate_sides(w_std, gates)
    qr, kr = gate_sides(w_rec, gates)
    routed = routed_heads(w_rec, routing_threshold)
    if variant == "full":
        if routed is not None:  # a routed head keeps only a_h q_i.k_j
            qr = torch.where(routed, torch.zeros_like(qr), qr)
        if backend == "triton" or (backend == "auto" and q.is_cuda and kernel_ok):
            return attend(q, k, v, col_bias=col_bias, scale=scale, dropout_p=dropout_p, triton=True,
                          a=qs * ks, b=qr * kr)
        qf, kf = _fold.full_qk(q, k, qs, ks, qr, kr)
        return attend(qf, kf, v, col_bias=col_bias, scale=scale, dropout_p=dropout_p, triton=False)
    qf, kf = _fold.activation_fold(q, k, W, qs, ks, qr, kr, routed, variant)
    use_triton = backend == "triton" or (backend == "auto" and col_bias is not None and q.is_cuda and kernel_ok
                                         and qf.shape[-1] == v.shape[-1])
    return attend(qf, kf, v, col_bias=col_bias, scale=scale, dropout_p=dropout_p, triton=use_triton)
