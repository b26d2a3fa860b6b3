"""Fused bias channel (RA-SPEC 3.3): the discoverability bias written into the reserved Q/K feature, one kernel
each way.

The folded GEMM emits ``qkv`` ``[B*T, N]`` whose reserved features are zero (``fold_qkv_weight(...,
bias_channel=True)``). For head ``h`` the K feature sits at column ``k0 + h * width`` and the Q feature at
``q0 + h * width``. The channel adds ``c_hj / (scale * kappa)`` to the K feature of key ``j`` and ``kappa`` to the
Q feature, so with the attention's ``scale`` it adds exactly ``c_hj`` to every logit of column ``j``.

What :func:`reciprocal_attention.fold.add_bias_channel` does with a few PyTorch ops (a strided in-place add, the
bias arithmetic and, backward, a strided gather, a batch sum and the bias chain's own kernels: 36 us per block
fwd+bwd at B=8, T=1024 on an H100, `benchmarks/results/h100/profile/`), these do in one kernel forward and one
backward (+ one small sum for ``dw_disc``):

* forward, grid ``(cdiv(T, BLOCK_T), B)``: ``qkv[b T + t, k0 + h width] += c[b?, h, t] * inv`` (and ``+= kappa``
  on the Q feature when ``q_channel``), in fp32 (fp64 for fp64 tensors), rounded once;
* backward, no atomics: ``s[h, t] = inv * sum_b g[b T + t, k0 + h width]`` (the batch sum inside the program for a
  shared ``[H, T]`` bias), written as ``dc``; for the positional bias ``c = w_disc[h] * d_bias[h, t]`` it writes
  ``d_bias``'s gradient ``w_disc[h] s[h, t]`` over the whole ``[H, block_size]`` (zeros past ``T``) and per-block
  partials of ``w_disc``'s, ``sum_t d_bias[h, t] s[h, t]``, summed in torch.

The gradient of ``qkv`` passes through unchanged (an addition). Eager and CUDA-graph calls only: under
``torch.compile`` the module keeps the PyTorch form, which inductor fuses itself. The entry points run on CUDA
tensors, or on any device under ``TRITON_INTERPRET=1`` (the CPU tests).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import INTERPRET, eager_launch
from .launch import cdiv, next_pow2
from .registry import TritonOp, launcher

__all__ = ["add_bias_channel_fused", "add_positional_bias_channel_fused", "fused_channel_usable"]

from .registry import tl, triton

if triton is not None:
    from .fold_kernels import _acc  # fp32 (fp64 for fp64 kernels) accumulation type, shared with the fold kernels

    @triton.jit
    def _scalar(x, ptr, FP64: tl.constexpr):
        """A float argument; fp64 kernels read it from ``ptr`` (Python floats reach Triton as fp32)."""
        if FP64:
            return tl.load(ptr)
        else:
            return x

    @triton.jit
    def _channel_fwd_kernel(qkv, s_qm, s_qn, T, H, q0, k0, step, c, c_sb, c_sh, c_st, w, inv, kappa, sc,
                            POSITIONAL: tl.constexpr, Q_CHANNEL: tl.constexpr, FP64: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        inv = _scalar(inv, sc, FP64)
        kappa = _scalar(kappa, sc + 1, FP64)
        pid_t = tl.program_id(0)
        b = tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.arange(0, BLOCK_H)
        mask = (t[:, None] < T) & (h[None, :] < H)
        cv = _acc(tl.load(c + b * c_sb + h[None, :] * c_sh + t[:, None] * c_st, mask=mask, other=0.0), FP64)
        if POSITIONAL:
            cv = cv * _acc(tl.load(w + h, mask=h < H, other=0.0), FP64)[None, :]
        rows = (b * T + t).to(tl.int64)[:, None] * s_qm
        kp = qkv + rows + (k0 + h[None, :] * step) * s_qn
        x = tl.load(kp, mask=mask)
        tl.store(kp, (_acc(x, FP64) + cv * inv).to(x.dtype), mask=mask)
        if Q_CHANNEL:
            qp = qkv + rows + (q0 + h[None, :] * step) * s_qn
            xq = tl.load(qp, mask=mask)
            tl.store(qp, (_acc(xq, FP64) + kappa).to(xq.dtype), mask=mask)

    @triton.jit
    def _channel_bwd_kernel(g, s_gm, s_gn, B, T, H, k0, step, inv, sc, c, c_sh, c_st, w, dc, dc_sb, dc_sh, dc_st,
                            L, pw, n_tb, POSITIONAL: tl.constexpr, SHARED: tl.constexpr, FP64: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        inv = _scalar(inv, sc, FP64)
        pid_t = tl.program_id(0)
        pid_b = tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.arange(0, BLOCK_H)
        mask = (t[:, None] < T) & (h[None, :] < H)
        cols = (k0 + h * step) * s_gn
        if SHARED:  # sum over the batch inside the program: [BLOCK_B, BLOCK_T, BLOCK_H] tiles
            bb = tl.arange(0, BLOCK_B)
            s = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float64 if FP64 else tl.float32)
            for b0 in range(0, B, BLOCK_B):
                rows = ((b0 + bb)[:, None] * T + t[None, :]).to(tl.int64) * s_gm
                m3 = ((b0 + bb) < B)[:, None, None] & mask[None, :, :]
                s += tl.sum(_acc(tl.load(g + rows[:, :, None] + cols[None, None, :], mask=m3, other=0.0), FP64),
                            axis=0)
        else:
            rows = (pid_b * T + t).to(tl.int64) * s_gm
            s = _acc(tl.load(g + rows[:, None] + cols[None, :], mask=mask, other=0.0), FP64)
        s = s * inv
        if POSITIONAL:  # c is d_bias [H, L]: write d_bias's gradient over all of [0, L) and w_disc partials
            wv = _acc(tl.load(w + h, mask=h < H, other=0.0), FP64)
            d = _acc(tl.load(c + h[None, :] * c_sh + t[:, None] * c_st, mask=mask, other=0.0), FP64)
            full = (t[:, None] < L) & (h[None, :] < H)
            tl.store(dc + h[None, :] * dc_sh + t[:, None] * dc_st, (s * wv[None, :]).to(dc.dtype.element_ty),
                     mask=full)
            tl.store(pw + h * n_tb + pid_t, tl.sum(s * d, axis=0), mask=h < H)
        else:
            tl.store(dc + pid_b * dc_sb + h[None, :] * dc_sh + t[:, None] * dc_st, s.to(dc.dtype.element_ty),
                     mask=mask)


def fused_channel_usable(qkv: Tensor) -> bool:
    """The fused kernels apply: an eager (or CUDA-graph) call on CUDA, or any device under the interpreter."""
    return triton is not None and (qkv.is_cuda or INTERPRET) and eager_launch(qkv)


def _scalars(ref: Tensor, *xs: float) -> Tensor:
    """fp64 kernels take their float arguments from a tensor (else a dummy: no host-to-device copy)."""
    return torch.tensor(xs, dtype=torch.float64, device=ref.device) if ref.dtype == torch.float64 else ref


def _blocks(H: int) -> tuple[int, int]:
    block_h = max(2, next_pow2(H))
    return block_h, max(16, 2048 // (block_h * 8)) if not INTERPRET else 16


def _channel_forward(qkv: Tensor, c: Tensor, w: Optional[Tensor], T: int, n_head: int, width: int, scale: float,
                     kappa: float, q_channel: bool) -> tuple[Tensor]:
    """Adds the channel to ``qkv`` in place and returns it."""
    positional = w is not None
    B = qkv.shape[0] // T
    block_h, block_t = _blocks(n_head)
    q0 = width - 1
    c_sb = 0 if (positional or c.dim() == 2) else c.stride(0)
    launcher(_channel_fwd_kernel, qkv)[(cdiv(T, block_t), B)](
        qkv, qkv.stride(0), qkv.stride(1), T, n_head, q0, n_head * width + q0, width, c, c_sb, c.stride(-2),
        c.stride(-1), w if positional else c, 1.0 / (scale * kappa), float(kappa),
        _scalars(qkv, 1.0 / (scale * kappa), kappa), POSITIONAL=positional, Q_CHANNEL=q_channel,
        FP64=qkv.dtype == torch.float64, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return (qkv,)


def _channel_backward(g: Tensor, c: Tensor, w: Optional[Tensor], B: int, T: int, H: int, width: int, scale: float,
                      kappa: float) -> tuple[Tensor, Optional[Tensor]]:
    """``(dc, dw)``: the gradient of ``c`` (``[H, T]``/``[B, H, T]``, or ``d_bias`` with ``w``) and of ``w``."""
    positional = w is not None
    shared = positional or c.dim() == 2
    block_h, block_t = _blocks(H)
    fp64 = g.dtype == torch.float64
    dc = torch.empty_like(c, memory_format=torch.contiguous_format)
    if positional:  # c is d_bias [H, L]
        L = c.shape[1]
        n_tb = cdiv(L, block_t)
        pw = torch.empty((H, n_tb), dtype=torch.float64 if fp64 else torch.float32, device=g.device)
        grid = (n_tb, 1)
    else:
        L, n_tb = T, 1
        pw = dc
        grid = (cdiv(T, block_t), 1 if shared else B)
    dc_sb = 0 if shared else dc.stride(0)
    launcher(_channel_bwd_kernel, g)[grid](
        g, g.stride(0), g.stride(1), B, T, H, H * width + width - 1, width, 1.0 / (scale * kappa),
        _scalars(g, 1.0 / (scale * kappa)), c, c.stride(-2), c.stride(-1),
        w if positional else c, dc, dc_sb, dc.stride(-2), dc.stride(-1), L, pw, n_tb,
        POSITIONAL=positional, SHARED=shared, FP64=fp64, BLOCK_B=min(8, next_pow2(B)),
        BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    # w_disc's gradient: one reduction kernel, summed in pw's dtype and rounded once into w's (no cast kernel)
    dw = torch.sum(pw, 1, out=torch.empty((H,), dtype=w.dtype, device=w.device)) if positional else None
    return dc, dw


def _setup_context(ctx, inputs: tuple, output) -> None:
    qkv, c, w, T, n_head, width, scale, kappa, _ = inputs
    ctx.mark_dirty(qkv)
    ctx.save_for_backward(c, w)
    ctx.meta = (qkv.shape[0] // T, T, n_head, width, scale, kappa)


def _grads(ctx, backward, g: Optional[Tensor]) -> tuple:
    c, w = ctx.saved_tensors
    if g is None:  # the output was not used: no gradient anywhere
        return (None,) * 9
    dc, dw = backward(g, c, w, *ctx.meta)
    return g, dc, dw, None, None, None, None, None, None  # qkv's gradient passes through the addition


# In place on the GEMM output, eager and CUDA-graph calls only: under torch.compile the module keeps the PyTorch
# form, which inductor fuses itself.
_CHANNEL = TritonOp("bias_channel", _channel_forward, _channel_backward, _setup_context, _grads, traceable=False)


def _check(qkv: Tensor, n_head: int, width: int, T: int, scale: float, kappa: float) -> None:
    if not isinstance(qkv, Tensor) or qkv.dim() != 2 or qkv._base is not None:
        raise ValueError(f"qkv must be the 2-D [B*T, N] GEMM output itself (not a view); got "
                         f"{list(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    if not fused_channel_usable(qkv):
        raise ValueError(f"the fused bias channel runs eagerly on CUDA tensors with Triton (or under "
                         f"TRITON_INTERPRET=1); got a tensor on {qkv.device}")
    if not (isinstance(T, int) and T >= 1 and qkv.shape[0] % T == 0):
        raise ValueError(f"T must be a positive int dividing qkv.shape[0] = {qkv.shape[0]}; got {T!r}")
    if not (isinstance(n_head, int) and n_head >= 1 and isinstance(width, int) and width >= 2
            and 2 * n_head * width <= qkv.shape[1]):
        raise ValueError(f"need n_head >= 1, width >= 2 and 2 * n_head * width <= qkv.shape[1] = {qkv.shape[1]}; "
                         f"got n_head={n_head!r}, width={width!r}")
    if not (scale > 0 and kappa != 0):
        raise ValueError(f"scale must be > 0 and kappa != 0; got scale={scale}, kappa={kappa}")


def _check_param(name: str, t: Tensor, shape: tuple, qkv: Tensor) -> None:
    if not (isinstance(t, Tensor) and t.is_floating_point() and t.device == qkv.device
            and t.dim() == len(shape) and all(s is None or a == s for a, s in zip(t.shape, shape))):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        got = f"{list(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape {want} on {qkv.device}; got {got}")


def add_bias_channel_fused(qkv: Tensor, col_bias: Tensor, n_head: int, width: int, scale: float,
                           kappa: float = 1.0, q_channel: bool = True) -> Tensor:
    """Fused :func:`reciprocal_attention.fold.add_bias_channel` (same contract): in place on ``qkv`` and returned.

    ``col_bias``: ``[H, T]`` (shared over the batch) or ``[B, H, T]``; ``T`` is read from it.
    """
    T = col_bias.shape[-1] if isinstance(col_bias, Tensor) else 0
    _check(qkv, n_head, width, T, scale, kappa)
    B = qkv.shape[0] // T
    _check_param("col_bias", col_bias, (n_head, T) if col_bias.dim() == 2 else (B, n_head, T), qkv)
    return _CHANNEL(qkv, col_bias, None, T, n_head, width, float(scale), float(kappa), q_channel)[0]


def add_positional_bias_channel_fused(qkv: Tensor, w_disc: Tensor, d_bias: Tensor, T: int, n_head: int,
                                      width: int, scale: float, kappa: float = 1.0,
                                      q_channel: bool = True) -> Tensor:
    """The positional bias ``c_ht = w_disc[h] * d_bias[h, t]`` (``t < T``, ``d_bias`` ``[H, block_size]``) formed
    inside the kernels: ``add_bias_channel(qkv, w_disc[:, None] * d_bias[:, :T], ...)`` with no other kernel
    forward and one small sum backward. Gradients flow to ``w_disc`` and ``d_bias``."""
    _check(qkv, n_head, width, T, scale, kappa)
    _check_param("w_disc", w_disc, (n_head,), qkv)
    _check_param("d_bias", d_bias, (n_head, None), qkv)
    if d_bias.shape[1] < T:
        raise ValueError(f"d_bias covers {d_bias.shape[1]} positions; T = {T} needs at least that many")
    return _CHANNEL(qkv, d_bias, w_disc, T, n_head, width, float(scale), float(kappa), q_channel)[0]
