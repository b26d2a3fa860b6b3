"""Fused causal Reciprocal-Attention kernel (Triton, FlashAttention-2 style): RA-SPEC sections 2, 3.3 and 3.4.

Per batch ``b`` and head ``h``, for query row ``i`` and key column ``j <= i``::

    l_ij = scale * (a_h * q_i.k_j + b_h * q_j.k_i) + c_j        c_j = col_bias[h, j] or col_bias[b, h, j]
    P = softmax_j(l),  O = P V

Public entry point: :func:`flash_ra_attention`.

* ``a`` (``[H]``) is optional: without it the standard term has coefficient 1 and no gradient. ``b`` (``[H]``)
  switches the reciprocal (``S^T``) term on and needs ``a``. ``col_bias`` is ``[H, T]`` (shared over the batch;
  its gradient is summed over ``B``) or ``[B, H, T]``. ``a``, ``b`` and ``col_bias`` are learnable: their
  gradients come back through autograd.
* ``q, k, v``: ``[B, H, T, D]``, one dtype (fp16/bf16, or fp32, which uses IEEE fp32 dots and is what the CPU
  interpreter tests run), one device, ``D`` in {16, 32, 64, 128}, any ``T >= 1``. Any strides with a unit
  stride on the last dim are used in place (no copy); other layouts are made contiguous once.

Design (no atomics anywhere, so gradients are bitwise reproducible; nothing of size ``T x T`` is allocated:
the extra memory is ``O(B H T)`` fp32 for the log-sum-exp, ``delta`` and the ``dc/da/db`` partials, plus,
only with the reciprocal term, two fp32 ``[B, H, T, D]`` partial-gradient buffers during the backward):

* forward, grid ``(cdiv(T, BLOCK_M), B*H)``: a program owns query block ``I`` (heaviest blocks launch first),
  loads ``Q[I]`` (and ``K[I]`` for the reciprocal term), and walks key blocks ``J <= I`` (causal tile skipping
  through loop bounds: unmasked tiles strictly below the diagonal, then the masked diagonal tiles), forming
  ``S = Q_I K_J^T`` and ``S' = K_I Q_J^T``, adding ``c[J]``, with an exp2 online softmax (log2(e) folded into
  the scale) and fp32 accumulators. Saves the per-row log-sum-exp (log2 units).
* backward 0 (``delta``), grid ``(cdiv(T, 64), B*H)``: ``delta_i = sum_d O_id dO_id``.
* backward 1 ("column" kernel), grid ``(cdiv(T, BLOCK_N), B*H)``: a program owns key block ``J``, walks query
  blocks ``I >= J``, recomputes ``P`` from the saved log-sum-exp and accumulates ``dV_J``, ``dK_J`` (the ``a``
  part), ``dQ_J`` (the reciprocal ``b`` part) and the column sums ``dc_j = sum_i dS_ij``, stored as a
  ``[B, H, T]`` fp32 partial (each column written by exactly one program; summed over ``B`` in torch for an
  ``[H, T]`` bias).
* backward 2 ("row" kernel), grid ``(cdiv(T, BLOCK_M), B*H)``: a program owns query block ``I``, walks key
  blocks ``J <= I``, and accumulates ``dQ_I`` (the ``a`` part), ``dK_I`` (the reciprocal ``b`` part) and the
  row sums ``scale * sum_j dS_ij S_ij`` and ``scale * sum_j dS_ij S'_ij``, stored as ``[B, H, T]`` fp32
  partials and summed over ``B, T`` in torch into ``da_h``, ``db_h`` (``O(B H T)``; kept here rather than in
  the column kernel, which holds three ``[BLOCK_N, D]`` accumulators already). Its epilogue adds the column
  kernel's fp32 partials for rows ``I`` (``dQ_I`` reciprocal part, ``dK_I`` ``a`` part) and writes the final
  ``dq``, ``dk``. It runs after the column kernel on the same stream.
* outputs follow the input layout: ``o``, ``dq`` like ``q``, ``dk`` like ``k``, ``dv`` like ``v`` (no copies after).

Why two backward kernels and not FlashAttention-2's one (which adds each key block's ``dS K`` to ``dQ`` with
float atomics): on an H100 (``benchmarks/results/h100/flash_bwd_ab.json``) a one-pass kernel is slower here
both with fp32 atomics (0.81 vs 0.70 ms core fwd+bwd at T=4096) and with a
deterministic hand-over of ``dQ`` between key blocks in a fixed order (1.03 ms): the extra ``[BLOCK_M, D]`` product
and accumulator push the column kernel to 255 registers, and the ordered hand-over puts an L2 round trip on
every iteration. Recomputing ``P`` and ``dP`` in a row kernel costs less.

Here ``dS = P * (dP - delta)`` is the gradient of the logits ``l``. Without the reciprocal term the two
backward kernels are independent and write ``dq``/``dk``/``dv`` directly.

Registered through :class:`~reciprocal_attention.ops.registry.TritonOp` as ``reciprocal_attention::flash_ra``
(and ``flash_ra_backward``): torch.compile(fullgraph=True) traces through it, eager calls launch the kernels
directly, CUDA graphs capture it.

Configs: with ``ops.settings.flash_autotune`` (default on) each attention kernel is autotuned over a few
``BLOCK_M/BLOCK_N/num_warps/num_stages`` configs keyed on ``T``, ``D``, the flags and the dtype; off, one fixed
spill-free config per kernel (fast to compile). The kernels are not specialised on ``T``.

Triton is imported guarded: importing this module never fails; :func:`flash_ra_attention` raises a
RuntimeError naming the problem when Triton is missing. ``TRITON_INTERPRET=1`` must be set before this module
is imported for the CPU interpreter; then each kernel uses one small config (16 x 16 blocks).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import INTERPRET
from .config import settings
from .launch import cdiv
from .registry import TritonOp, launcher, require_triton, triton

__all__ = ["flash_ra_attention", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


if triton is not None:
    from .flash_kernels import _BWD_COL, _BWD_ROW, _FWD, _bwd_delta_kernel


# ----------------------------------------------------------------------------------------------------------
# Launch functions (the op's forward and backward; the custom ops' schemas come from their annotations)
# ----------------------------------------------------------------------------------------------------------
def _tuned(kernels: tuple):
    """The autotuned wrapper of a kernel, or its one fixed config (``settings.flash_autotune``)."""
    return kernels[0] if settings.flash_autotune else kernels[1]


def _strides3(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _empty_like_layout(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised dense tensor of ``x``'s shape (and device; ``dtype`` or ``x``'s) whose dims lie in memory
    in the order of ``x``'s strides.

    Why: q, k, v are usually ``[B, H, T, D]`` views of a ``[B, T, 3C]`` projection (memory order B, T, H, D).
    Outputs in that order are what the caller's ``transpose(1, 2).reshape(B, T, C)`` and autograd's backward of
    ``view(B, T, H, D)`` take without a copy (contiguous outputs cost four full copies per block). The dims but
    the last are sorted by stride, descending (ties keep their natural order); the last dim stays innermost (the
    kernels assume unit stride there). A contiguous ``x`` gets a contiguous result. Where a row offset could
    overflow the kernels' int32 row arithmetic (:func:`_needs_copy`; reachable only for inputs with zero or
    overlapping strides) the result is contiguous instead. The launchers and the fake implementations both
    allocate through here (the fake implementation is the launch function run on fake tensors), so real and fake
    outputs have the same strides (torch.compile relies on it).
    """
    n = x.dim()
    order = sorted(range(n - 1), key=lambda i: -x.stride(i)) + [n - 1]  # outermost first; sorted() is stable
    dtype = x.dtype if dtype is None else dtype
    out = torch.empty([x.shape[i] for i in order], dtype=dtype, device=x.device)
    out = out.permute(sorted(range(n), key=order.__getitem__))  # the inverse permutation: back to x's dim order
    if _needs_copy(out):
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    return out


def _bias_strides(col_bias: Tensor | None) -> tuple[int, int, int]:
    if col_bias is None:
        return 0, 0, 0
    if col_bias.dim() == 2:  # [H, T], broadcast over the batch
        return 0, col_bias.stride(0), col_bias.stride(1)
    return col_bias.stride(0), col_bias.stride(1), col_bias.stride(2)


def _flags(q: Tensor, col_bias, a, b) -> dict:
    return dict(
        D=q.shape[-1], HAS_A=a is not None, RECIP=b is not None, HAS_BIAS=col_bias is not None,
        IEEE=q.dtype == torch.float32,
    )


# The op signatures use typing.Optional (torch.library's canonical form on every torch version)
def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, col_bias: Optional[Tensor], a: Optional[Tensor],
              b: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    B, H, T, D = q.shape
    o = _empty_like_layout(q)  # q's memory order (e.g. B, T, H, D): no copy for the caller's reshape
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    dummy = q  # stands in for absent optional pointers; never dereferenced (constexpr-guarded)

    def grid(meta):
        return (cdiv(T, meta["BLOCK_M"]), B * H)

    launcher(_tuned(_FWD), q)[grid](
        q, k, v, o, lse,
        dummy if col_bias is None else col_bias, dummy if a is None else a, dummy if b is None else b,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *_bias_strides(col_bias),
        H, T, scale, **_flags(q, col_bias, a, b),
    )
    return o, lse


def _bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, col_bias: Optional[Tensor],
              a: Optional[Tensor], b: Optional[Tensor], scale: float
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, H, T, D = q.shape
    if do.stride(-1) != 1 or _needs_copy(do):
        do = do.contiguous()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    dev = q.device
    f32 = torch.float32
    flags = _flags(q, col_bias, a, b)
    recip = b is not None
    # each gradient in its input's memory order: no copy in autograd's backward of the caller's view/transpose
    dq, dk, dv = _empty_like_layout(q), _empty_like_layout(k), _empty_like_layout(v)
    delta = torch.empty((B, H, T), dtype=f32, device=dev)

    def empty():  # a distinct 0-size tensor per absent output (op outputs must not alias each other)
        return torch.empty(0, dtype=f32, device=dev)

    # with the reciprocal term the column kernel leaves fp32 partials that the row kernel completes; they take
    # the strides of dk and dq (same shape and order, so the same element strides): one set of strides each
    dkp = _empty_like_layout(k, f32) if recip else dk
    dqr = _empty_like_layout(q, f32) if recip else empty()
    dc_part = torch.empty((B, H, T), dtype=f32, device=dev) if col_bias is not None else empty()
    da_part = torch.empty((B, H, T), dtype=f32, device=dev) if a is not None else empty()
    db_part = torch.empty((B, H, T), dtype=f32, device=dev) if recip else empty()
    dummy = q
    cb_arg = dummy if col_bias is None else col_bias
    a_arg = dummy if a is None else a
    b_arg = dummy if b is None else b
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_bias_strides(col_bias),
               *_strides3(dq), *_strides3(dk), *_strides3(dv))

    delta_block = 16 if INTERPRET else 64
    launcher(_bwd_delta_kernel, q)[(cdiv(T, delta_block), B * H)](
        o, do, delta, *_strides3(o), *_strides3(do), H, T, D=D, BLOCK=delta_block)

    def grid_n(meta):
        return (cdiv(T, meta["BLOCK_N"]), B * H)

    def grid_m(meta):
        return (cdiv(T, meta["BLOCK_M"]), B * H)

    launcher(_tuned(_BWD_COL), q)[grid_n](
        q, k, v, do, lse, delta, cb_arg, a_arg, b_arg,
        dkp, dv, dqr, dc_part,
        *strides, H, T, scale, **flags)
    launcher(_tuned(_BWD_ROW), q)[grid_m](
        q, k, v, do, lse, delta, cb_arg, a_arg, b_arg,
        dq, dk, dqr, dkp, da_part, db_part,
        *strides, H, T, scale, **flags)

    # O(B H T) reductions of the per-column partials (deterministic)
    if col_bias is None:
        dc = empty()
    elif col_bias.dim() == 2:
        dc = dc_part.sum(0).to(col_bias.dtype)
    else:
        dc = dc_part.to(col_bias.dtype)
    da = da_part.sum(dim=(0, 2)).to(a.dtype) if a is not None else empty()
    db = db_part.sum(dim=(0, 2)).to(b.dtype) if recip else empty()
    return dq, dk, dv, dc, da, db


def _needs_copy(x: Tensor) -> bool:
    """True when the last dim is strided or a row offset could overflow the kernels' int32 row arithmetic."""
    if x.stride(-1) != 1:
        return True
    return (x.shape[-2] - 1) * x.stride(-2) + x.shape[-1] > _INT32_MAX


# ----------------------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs: tuple, output) -> None:
    q, k, v, col_bias, a, b, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, col_bias, a, b)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _grads(ctx, backward, do: Tensor, _dlse: Optional[Tensor]) -> tuple:
    q, k, v, o, lse, col_bias, a, b = ctx.saved_tensors
    dq, dk, dv, dc, da, db = backward(do, q, k, v, o, lse, col_bias, a, b, ctx.scale)
    return (dq, dk, dv, dc if col_bias is not None else None, da if a is not None else None,
            db if b is not None else None, None)


_FLASH = TritonOp("flash_ra", _fwd_impl, _bwd_impl, _setup_context, _grads)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _check_gate(name: str, x, ref: Tensor, H: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"flash_ra_attention: `{name}` must be a torch.Tensor of shape [H]=[{H}] or None; "
                        f"got {type(x).__name__}")
    if tuple(x.shape) != (H,):
        raise ValueError(f"flash_ra_attention: `{name}` must have shape [H]=[{H}]; got {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"flash_ra_attention: `{name}` must be a floating-point tensor; got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"flash_ra_attention: `{name}` must be on q's device {ref.device}; got {x.device}")


def _validate(q, k, v, scale, col_bias, a, b) -> float:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"flash_ra_attention: `{name}` must be a torch.Tensor; got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"flash_ra_attention: `q` must have shape [B, H, T, D] (4 dims); got {list(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"flash_ra_attention: `{name}` must have q's shape [B, H, T, D]={list(q.shape)}; "
                             f"got {list(x.shape)}")
    B, H, T, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_ra_attention: head dim D = q.shape[-1] must be one of {SUPPORTED_HEAD_DIMS}; "
                         f"got D={D}")
    if T < 1 or B < 1 or H < 1:
        raise ValueError(f"flash_ra_attention: `q` must have B, H, T >= 1; got shape {list(q.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"flash_ra_attention: `q` dtype must be one of float16, bfloat16, float32; got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"flash_ra_attention: `{name}` must have q's dtype {q.dtype}; got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"flash_ra_attention: `{name}` must be on q's device {q.device}; got {x.device}")
    if q.device.type != "cuda" and not (INTERPRET and q.device.type == "cpu"):
        raise ValueError(f"flash_ra_attention: `q`, `k`, `v` must be CUDA tensors (CPU only under "
                         f"TRITON_INTERPRET=1, set before import); got device {q.device}")
    if col_bias is not None:
        if not isinstance(col_bias, Tensor):
            raise TypeError(f"flash_ra_attention: `col_bias` must be a torch.Tensor or None; "
                            f"got {type(col_bias).__name__}")
        if tuple(col_bias.shape) not in ((H, T), (B, H, T)):
            raise ValueError(f"flash_ra_attention: `col_bias` must have shape [H, T]=[{H}, {T}] or "
                             f"[B, H, T]=[{B}, {H}, {T}]; got {list(col_bias.shape)}")
        if not col_bias.is_floating_point():
            raise TypeError(f"flash_ra_attention: `col_bias` must be a floating-point tensor; got {col_bias.dtype}")
        if col_bias.device != q.device:
            raise ValueError(f"flash_ra_attention: `col_bias` must be on q's device {q.device}; "
                             f"got {col_bias.device}")
    if b is not None and a is None:
        raise ValueError("flash_ra_attention: `b` (the reciprocal coefficient) needs `a` as well; pass a=ones(H) "
                         "for a plain standard term")
    if a is not None:
        _check_gate("a", a, q, H)
    if b is not None:
        _check_gate("b", b, q, H)
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(float(scale)):
        raise TypeError(f"flash_ra_attention: `scale` must be a finite Python float or None; got {scale!r}")
    return float(scale)


def flash_ra_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                       col_bias: Tensor | None = None, a: Tensor | None = None,
                       b: Tensor | None = None) -> Tensor:
    """Fused causal RA attention: ``softmax_j(scale * (a_h q_i.k_j + b_h q_j.k_i) + c_j) V`` -> ``[B, H, T, D]``.

    Args:
        q, k, v: ``[B, H, T, D]``, one dtype (float16, bfloat16 or float32), one CUDA device (CPU under
            ``TRITON_INTERPRET=1``), ``D`` in {16, 32, 64, 128}, ``T >= 1``. Any strides with unit stride on
            the last dim are read in place; other layouts are copied once.
        scale: logit scale, default ``1/sqrt(D)`` (also for the reciprocal term: RA-SPEC 3.4).
        col_bias: optional column bias ``c`` of shape ``[H, T]`` (shared over the batch) or ``[B, H, T]``, any
            float dtype and strides. Must be finite (``-inf`` entries are not supported; to mask keys use a large
            negative number such as ``-1e4``).
        a: optional ``[H]`` coefficient of the standard term; omitted, the coefficient is 1 (and has no gradient).
        b: optional ``[H]`` coefficient of the reciprocal term ``q_j.k_i``; needs ``a``.

    The output has ``q``'s memory order (e.g. B, T, H, D for views of a ``[B, T, 3C]`` projection, so
    ``out.transpose(1, 2).reshape(B, T, C)`` is free); likewise the gradients of ``q, k, v`` have their layouts.
    Gradients flow to ``q, k, v`` and to whichever of ``col_bias, a, b`` are given (in their own dtypes).
    Deterministic (no atomics). Memory: no ``T x T`` tensor; ``O(B H T)`` fp32 side buffers, plus
    ``2 B H T D`` fp32 during the backward when ``b`` is given.
    """
    require_triton("flash_ra_attention", "install triton (pip install 'reciprocal-attention[triton]') or use "
                   "the SDPA-based fold path")
    scale = _validate(q, k, v, scale, col_bias, a, b)
    if _needs_copy(q):
        q = q.contiguous()
    if _needs_copy(k):
        k = k.contiguous()
    if _needs_copy(v):
        v = v.contiguous()
    # the kernels read a[h], b[h] at unit stride (a no-op for ordinary [H] parameters)
    a = a.contiguous() if a is not None else None
    b = b.contiguous() if b is not None else None
    return _FLASH(q, k, v, col_bias, a, b, scale)[0]
