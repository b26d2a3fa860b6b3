"""Fused weight-space fold (RA-SPEC 3.2, GitHub issue 3): one kernel builds the folded ``c_attn`` weight, two map
its gradient back.

:func:`fused_fold_qkv_weight` has the semantics and output layout of
:func:`reciprocal_attention.fold.fold_qkv_weight` (the readable oracle); read that first. Per head ``h``::

    Wq~^h = [ qs_h Wq^h[:Ds] ; qr_h W^T Wk^h ]        Wk~^h = [ ks_h Wk^h[:Ds] ; kr_h W^T Wq^h ]

(bias likewise, as if it were column ``C`` of the weight); a routed head takes ``qs_h Wq^h`` / ``ks_h Wk^h`` over
the full ``D`` (and zero reciprocal rows for ``low_rank``); the V rows are copied. With ``bias_channel`` the
standard part is ``Ds = D - R - 1`` rows and each head's last row is reserved for the column bias (zero, and
``kappa = 1`` on the Q side of the folded bias; ``fold.add_bias_channel`` fills the K side after the GEMM). The
output is one contiguous ``[2 H D' + C, C]`` tensor in ``out_dtype``: under autocast pass ``torch.bfloat16`` and
the fold replaces the fp32 -> bf16 cast that ``F.linear`` would run on ``weight`` anyway.

Two entry points: :func:`fused_fold_qkv_weight` takes the four gate sides ``qs, ks, qr, kr`` and a routing mask
as tensors; :func:`fused_fold_gated` (what the module uses) takes the raw gates ``w_std, w_rec``, the gate form
and the routing threshold, and forms sides and routing inside the kernels (``GATES``/``ROUTE`` constexprs), so
no other kernel runs around the fold, forward or backward.

Kernels
-------
* ``_fold_fwd_kernel``, grid ``(H, n_cb + has_bias, 2)``: program ``(h, j, 0)`` loads the ``[D, BLOCK_C]`` tiles
  of ``Wq^h``, ``Wk^h`` (columns ``j*BLOCK_C ...``; the extra block ``j == n_cb`` reads the bias as one column),
  forms ``W^T Wk^h`` and ``W^T Wq^h`` with two ``tl.dot`` (``R`` padded to 16) and writes the ``D'`` rows of
  ``Q~^h`` and ``K~^h``; program ``(h, j, 1)`` copies (casts) the ``D`` rows of ``V^h``. Every output element is
  written once.
* ``_fold_bwd_kernel``, grid ``(H, n_cb + has_bias, 2 * n_db)`` (or the weight's column blocks and the bias column
  in two launches, ``J0`` the first column block of a launch): programs ``(h, j, db < n_db)`` own ``BLOCK_D``
  rows of head ``h``'s Q and K weights and one column block: they write ``dWq^h``, ``dWk^h`` there
  (``qs dQ~[:Ds] + kr W dK~[Ds:]`` etc.; the Q side, then the K side, to keep half the tiles live) and store fp32
  partials: ``qr Wk^h dQ~[Ds:]^T + kr Wq^h dK~[Ds:]^T`` (``[BLOCK_D, R]``, for ``dW``) and the four gate sums
  (``sum Wq*dQ~`` over the std rows, ``sum Wk*dK~``, ``sum W * (Wk dQ~[Ds:]^T)``, ``sum W * (Wq dK~[Ds:]^T)``);
  programs ``(h, j, db >= n_db)`` copy the gradient of the V rows.
* ``_fold_bwd_reduce_kernel``: sums the partials in a fixed order (no atomics anywhere, so two runs give
  bitwise-equal gradients) and writes ``dW`` and the gate gradients (the four sides', or ``dw_std, dw_rec``
  through the chain rule of the gate form) in their parameters' dtypes.

Precision: arithmetic in fp32 (fp64 for fp64 weights). ``tl.dot`` runs on tf32 tensor cores: one product when
every operand is bf16/fp16 (tf32 holds those exactly, so the result is the IEEE one), ``tf32x3`` (three
products, fp32-level accuracy) when an operand is fp32. On an H100 at GPT-2 small: forward 3.9 us, backward
8.5 us with bf16 parameters (``benchmarks/results/h100/profile``).

Registered as the custom ops ``reciprocal_attention::fold_qkv`` and ``reciprocal_attention::fold_qkv_backward``
(``torch.library.triton_op``, torch >= 2.6) so the fold works under ``torch.compile(fullgraph=True)``; eager calls
(and torch < 2.6) go through a plain ``autograd.Function`` around the same kernels, which costs less host time
than the custom-op dispatch. Both run inside CUDA graphs. Under the Triton interpreter (``TRITON_INTERPRET=1``
when this module is imported: the CPU tests) the ops are opaque ``torch.library.custom_op``s, as ``wrap_triton``
cannot trace interpreted kernels. Triton is imported guarded: importing this module never fails, calling the
fold without Triton raises ``RuntimeError``. Not twice differentiable.
"""

import logging
import os
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..fold import FOLDED_VARIANTS, folded_width, std_width
from . import INTERPRET, eager_launch
from .launch import direct

log = logging.getLogger(__name__)

try:  # guarded: the module imports without Triton; calling the fold then raises a clear RuntimeError
    import triton
    import triton.language as tl

    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_OP_NAMESPACE = "reciprocal_attention"


def triton_available() -> bool:
    """True when Triton imported; the fold then runs on CUDA tensors (or any tensors with ``TRITON_INTERPRET=1``)."""
    return _TRITON_ERROR is None


# Triton decides interpreter-or-compiler when a kernel is decorated (at import, below); so does this module.
_INTERPRET = INTERPRET


def _interpreting() -> bool:
    """True when the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import; CPU tests)."""
    return _INTERPRET


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------------------
# Kernels: defined at import when Triton imports. TRITON_INTERPRET is read when a kernel is decorated, so set it
# before importing this module (tests/conftest.py does). Helpers are module globals: the interpreter resolves
# called jit functions there, not in closures.
# ---------------------------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _mm(x, y, FP64: tl.constexpr, IEEE: tl.constexpr):
        # IEEE (some operand is fp32): tf32x3, three tf32 tensor-core products (hi*hi + hi*lo + lo*hi), fp32-level
        # accuracy at tensor-core speed (fp32 FMA dots cost the backward ~10 us on an H100); else every operand is
        # bf16/fp16, which one tf32 product holds exactly (the IEEE result, see _ieee)
        if FP64:
            r = tl.dot(x.to(tl.float64), y.to(tl.float64), input_precision="ieee")
        elif IEEE:
            r = tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="tf32x3")
        else:
            r = tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="tf32")
        return r

    @triton.jit
    def _acc(x, FP64: tl.constexpr):
        if FP64:
            r = x.to(tl.float64)
        else:
            r = x.to(tl.float32)
        return r

    @triton.jit
    def _head_gates(g0, g1, g2, g3, routed_ptr, thr, h, GATES: tl.constexpr, ROUTE: tl.constexpr,
                    FP64: tl.constexpr):
        """Sides ``(qs, ks, qr, kr)`` of head ``h`` and its routed flag ``rt`` (int32 0/1).

        GATES 0: the four sides are given (g0..g3). 1 (signed): ``qs = w_std, ks = 1, qr = w_rec, kr = 1``
        (g0 = w_std, g2 = w_rec). 2 (seed): every side is ``sqrt(max(w, 1e-8))``. ROUTE 0: none; 1: bool
        tensor; 2: ``w_rec[h] <= thr`` (g2 = w_rec). Same math as ``reference.gate_sides``/``routed_heads``.
        """
        w0 = _acc(tl.load(g0 + h), FP64)
        w2 = _acc(tl.load(g2 + h), FP64)
        if GATES == 0:
            qs = w0
            ks = _acc(tl.load(g1 + h), FP64)
            qr = w2
            kr = _acc(tl.load(g3 + h), FP64)
        elif GATES == 1:
            qs = w0
            ks = w0 * 0.0 + 1.0
            qr = w2
            kr = w2 * 0.0 + 1.0
        else:
            qs = tl.sqrt(tl.maximum(w0, 1e-8))
            ks = qs
            qr = tl.sqrt(tl.maximum(w2, 1e-8))
            kr = qr
        if ROUTE == 1:
            rt = (tl.load(routed_ptr + h) != 0).to(tl.int32)
        elif ROUTE == 2:
            rt = (tl.load(g2 + h).to(tl.float32) <= thr).to(tl.int32)
        else:
            rt = h * 0
        return qs, ks, qr, kr, rt

    @triton.jit
    def _fwd_tile(src, dst, W_ptr, row_stride, n_cols, c0, h, rt, qs, ks, qr, kr, C, H, D, R, DS, DP,
                  COL_STRIDE: tl.constexpr, LOW_RANK: tl.constexpr, FP64: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        d = tl.arange(0, BLOCK_D)
        r = tl.arange(0, BLOCK_R)
        c = c0 + tl.arange(0, BLOCK_C)
        dm = d < D
        cm = c < n_cols
        m = dm[:, None] & cm[None, :]
        col = c[None, :] * COL_STRIDE
        out_ty = dst.dtype.element_ty
        wq = tl.load(src + ((h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        wk = tl.load(src + ((C + h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        wt = tl.load(W_ptr + d[None, :] * R + r[:, None], mask=(r < R)[:, None] & dm[None, :], other=0.0)
        # Standard rows: the first Ds rows, all D rows of a routed head.
        sm = (d < DS + rt * (D - DS))[:, None] & cm[None, :]
        tl.store(dst + ((h * DP + d) * row_stride)[:, None] + col, (qs * _acc(wq, FP64)).to(out_ty), mask=sm)
        tl.store(dst + ((H * DP + h * DP + d) * row_stride)[:, None] + col, (ks * _acc(wk, FP64)).to(out_ty),
                 mask=sm)
        # Rows past the reciprocal ones (the reserved bias channel, same_flop with bias_channel): zero.
        # The folded bias (COL_STRIDE 0) carries the channel's kappa = 1 on the Q side, as fold.fold_qkv_weight.
        zm = ((d >= DS + R) & (d < DP))[:, None] & cm[None, :]
        zero = tl.zeros([BLOCK_D, BLOCK_C], dtype=tl.float32)
        if COL_STRIDE == 0:
            q_fill = zero + 1.0
        else:
            q_fill = zero
        tl.store(dst + ((h * DP + d) * row_stride)[:, None] + col, q_fill.to(out_ty), mask=zm)
        tl.store(dst + ((H * DP + h * DP + d) * row_stride)[:, None] + col, zero.to(out_ty), mask=zm)
        # Reciprocal rows Ds .. Ds+R: W^T Wk^h (Q~) and W^T Wq^h (K~); zero for a routed low_rank head, and not
        # written for a routed same_flop head (its std rows cover them).
        live = rt == 0
        if LOW_RANK:
            rm = (r < R)[:, None] & cm[None, :]
        else:
            rm = ((r < R) & live)[:, None] & cm[None, :]
        rq = _mm(wt, wk, FP64, IEEE)
        tl.store(dst + ((h * DP + DS + r) * row_stride)[:, None] + col,
                 tl.where(live, qr * rq, 0.0).to(out_ty), mask=rm)
        rk = _mm(wt, wq, FP64, IEEE)
        tl.store(dst + ((H * DP + h * DP + DS + r) * row_stride)[:, None] + col,
                 tl.where(live, kr * rk, 0.0).to(out_ty), mask=rm)

    @triton.jit
    def _copy_rows(src, dst, src_row0, dst_row0, n_rows, row_stride, n_cols, c0,
                   COL_STRIDE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
        # V rows: the fold copies (casts) them, its backward copies their gradient back
        d = tl.arange(0, BLOCK_D)
        c = c0 + tl.arange(0, BLOCK_C)
        m = (d < n_rows)[:, None] & (c < n_cols)[None, :]
        col = c[None, :] * COL_STRIDE
        x = tl.load(src + ((src_row0 + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        tl.store(dst + ((dst_row0 + d) * row_stride)[:, None] + col, x.to(dst.dtype.element_ty), mask=m)

    # Only C (the row stride) is worth specializing (16-divisibility -> vectorized rows); not specializing the other
    # sizes saves recompiles across shapes.
    @triton.jit(do_not_specialize=["H", "D", "R", "DS", "DP", "thr"])
    def _fold_fwd_kernel(w_ptr, b_ptr, W_ptr, g0, g1, g2, g3, routed_ptr, thr, ow_ptr, ob_ptr,
                         C, H, D, R, DS, DP,
                         HAS_BIAS: tl.constexpr, GATES: tl.constexpr, ROUTE: tl.constexpr,
                         LOW_RANK: tl.constexpr, FP64: tl.constexpr, IEEE: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CB: tl.constexpr):
        # grid (H, n_cb + HAS_BIAS, 2): axis 2 = 0 folds the Q/K rows of head h, 1 copies its V rows
        h = tl.program_id(0)
        j = tl.program_id(1)
        n_cb = tl.cdiv(C, BLOCK_C)
        if tl.program_id(2) == 1:
            if j < n_cb:
                _copy_rows(w_ptr, ow_ptr, 2 * C + h * D, 2 * H * DP + h * D, D, C, C, j * BLOCK_C, 1,
                           BLOCK_D, BLOCK_C)
            else:
                if HAS_BIAS:  # the bias is one more column (row stride 1)
                    _copy_rows(b_ptr, ob_ptr, 2 * C + h * D, 2 * H * DP + h * D, D, 1, 1, 0, 0, BLOCK_D, BLOCK_CB)
        else:
            qs, ks, qr, kr, rt = _head_gates(g0, g1, g2, g3, routed_ptr, thr, h, GATES, ROUTE, FP64)
            if j < n_cb:
                _fwd_tile(w_ptr, ow_ptr, W_ptr, C, C, j * BLOCK_C, h, rt, qs, ks, qr, kr, C, H, D, R, DS, DP,
                          1, LOW_RANK, FP64, IEEE, BLOCK_D, BLOCK_R, BLOCK_C)
            else:
                if HAS_BIAS:
                    _fwd_tile(b_ptr, ob_ptr, W_ptr, 1, 1, 0, h, rt, qs, ks, qr, kr, C, H, D, R, DS, DP,
                              0, LOW_RANK, FP64, IEEE, BLOCK_D, BLOCK_R, BLOCK_CB)

    @triton.jit
    def _bwd_tile(g_src, w_src, g_dst, W_ptr, pw_ptr, ps_ptr, slot, ps_slot, d0, row_stride, n_cols, c0, h, rt,
                  qs, ks, qr, kr, C, H, D, R, DS, DP,
                  COL_STRIDE: tl.constexpr, FP64: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # This program owns rows [d0, d0 + BLOCK_D) of head h's Q and K rows and one column block. The code is
        # ordered Q side, then K side, so that only about half of the tiles are live at a time.
        d = d0 + tl.arange(0, BLOCK_D)
        r = tl.arange(0, BLOCK_R)
        c = c0 + tl.arange(0, BLOCK_C)
        dm = d < D
        rmask = r < R
        cm = c < n_cols
        m = dm[:, None] & cm[None, :]
        mr = rmask[:, None] & cm[None, :]
        col = c[None, :] * COL_STRIDE
        out_ty = g_dst.dtype.element_ty
        live = rt == 0
        std = (d < DS + rt * (D - DS))[:, None]
        Wm = tl.load(W_ptr + d[:, None] * R + r[None, :], mask=dm[:, None] & rmask[None, :], other=0.0)
        # Q side. dWq^h = [std] qs dQ~ + kr W dK~[Ds:];  t2 = Wq^h dK~[Ds:]^T  [D, R]
        gq = _acc(tl.load(g_src + ((h * DP + d) * row_stride)[:, None] + col, mask=m, other=0.0), FP64)
        gkr = tl.load(g_src + ((H * DP + h * DP + DS + r) * row_stride)[:, None] + col, mask=mr, other=0.0)
        wq = _acc(tl.load(w_src + ((h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0), FP64)
        dq = tl.where(std, qs * gq, 0.0) + tl.where(live, kr * _mm(Wm, gkr, FP64, IEEE), 0.0)
        tl.store(g_dst + ((h * D + d) * row_stride)[:, None] + col, dq.to(out_ty), mask=m)
        p_qs = tl.sum(tl.sum(tl.where(std, wq * gq, 0.0), axis=1), axis=0)
        t2 = _mm(wq, tl.trans(gkr), FP64, IEEE)
        # K side. dWk^h = [std] ks dK~ + qr W dQ~[Ds:];  t1 = Wk^h dQ~[Ds:]^T
        gk = _acc(tl.load(g_src + ((H * DP + h * DP + d) * row_stride)[:, None] + col, mask=m, other=0.0), FP64)
        gqr = tl.load(g_src + ((h * DP + DS + r) * row_stride)[:, None] + col, mask=mr, other=0.0)
        wk = _acc(tl.load(w_src + ((C + h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0), FP64)
        dk = tl.where(std, ks * gk, 0.0) + tl.where(live, qr * _mm(Wm, gqr, FP64, IEEE), 0.0)
        tl.store(g_dst + ((C + h * D + d) * row_stride)[:, None] + col, dk.to(out_ty), mask=m)
        p_ks = tl.sum(tl.sum(tl.where(std, wk * gk, 0.0), axis=1), axis=0)
        t1 = _mm(wk, tl.trans(gqr), FP64, IEEE)
        # Partials: dW += qr t1 + kr t2 (per slot), and the gate sums sum W*t1, sum W*t2.
        Wa = _acc(Wm, FP64)
        p_qr = tl.where(live, tl.sum(tl.sum(Wa * t1, axis=1), axis=0), 0.0)
        p_kr = tl.where(live, tl.sum(tl.sum(Wa * t2, axis=1), axis=0), 0.0)
        pw = tl.where(live, qr * t1 + kr * t2, 0.0)
        tl.store(pw_ptr + slot * (D * R) + d[:, None] * R + r[None, :], pw.to(pw_ptr.dtype.element_ty),
                 mask=dm[:, None] & rmask[None, :])
        ps_ty = ps_ptr.dtype.element_ty
        tl.store(ps_ptr + ps_slot * 4 + 0, p_qs.to(ps_ty))
        tl.store(ps_ptr + ps_slot * 4 + 1, p_ks.to(ps_ty))
        tl.store(ps_ptr + ps_slot * 4 + 2, p_qr.to(ps_ty))
        tl.store(ps_ptr + ps_slot * 4 + 3, p_kr.to(ps_ty))

    @triton.jit(do_not_specialize=["H", "D", "R", "DS", "DP", "thr", "J0"])
    def _fold_bwd_kernel(gw_ptr, gb_ptr, w_ptr, b_ptr, W_ptr, g0, g1, g2, g3, routed_ptr, thr,
                         dw_ptr, db_ptr, pw_ptr, ps_ptr,
                         C, H, D, R, DS, DP, J0,
                         HAS_BIAS: tl.constexpr, GATES: tl.constexpr, ROUTE: tl.constexpr, FP64: tl.constexpr,
                         IEEE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_CB: tl.constexpr):
        # grid (H, n_cb + HAS_BIAS, 2 * n_db), or a part of axis 1 starting at column block J0 (the weight's
        # columns and the bias column in two launches): axis 2 < n_db works on d-block db of the Q/K rows, the rest
        # copy the V rows' gradient (d-block db - n_db)
        h = tl.program_id(0)
        j = tl.program_id(1) + J0
        n_db = tl.num_programs(2) // 2
        db = tl.program_id(2)
        n_cb = tl.cdiv(C, BLOCK_C)
        if db >= n_db:
            d0 = (db - n_db) * BLOCK_D
            n_rows = tl.minimum(D - d0, BLOCK_D)
            if j < n_cb:
                _copy_rows(gw_ptr, dw_ptr, 2 * H * DP + h * D + d0, 2 * C + h * D + d0, n_rows, C, C, j * BLOCK_C,
                           1, BLOCK_D, BLOCK_C)
            else:
                if HAS_BIAS:
                    _copy_rows(gb_ptr, db_ptr, 2 * H * DP + h * D + d0, 2 * C + h * D + d0, n_rows, 1, 1, 0, 0,
                               BLOCK_D, BLOCK_CB)
        else:
            slot = h * (n_cb + HAS_BIAS) + j  # dW partials: rows of one slot are split over the d-blocks
            ps_slot = slot * n_db + db  # gate partials: one per program
            d0 = db * BLOCK_D
            qs, ks, qr, kr, rt = _head_gates(g0, g1, g2, g3, routed_ptr, thr, h, GATES, ROUTE, FP64)
            if j < n_cb:
                _bwd_tile(gw_ptr, w_ptr, dw_ptr, W_ptr, pw_ptr, ps_ptr, slot, ps_slot, d0, C, C, j * BLOCK_C, h,
                          rt, qs, ks, qr, kr, C, H, D, R, DS, DP, 1, FP64, IEEE, BLOCK_D, BLOCK_R, BLOCK_C)
            else:
                if HAS_BIAS:
                    _bwd_tile(gb_ptr, b_ptr, db_ptr, W_ptr, pw_ptr, ps_ptr, slot, ps_slot, d0, 1, 1, 0, h, rt,
                              qs, ks, qr, kr, C, H, D, R, DS, DP, 0, FP64, IEEE, BLOCK_D, BLOCK_R, BLOCK_CB)

    @triton.jit(do_not_specialize=["n_slots", "n_per_head", "H", "DR"])
    def _fold_bwd_reduce_kernel(pw_ptr, ps_ptr, dW_ptr, g0, g2, d0_ptr, d1_ptr, d2_ptr, d3_ptr,
                                n_slots, n_per_head, H, DR,
                                GATES: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
                                BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr):
        pid = tl.program_id(0)
        n_e = tl.cdiv(DR, BLOCK_E)
        if pid < n_e:  # dW[e] = sum over slots (all heads, all column blocks) of the partials, fixed order
            e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
            em = e < DR
            acc = tl.zeros([BLOCK_E], dtype=pw_ptr.dtype.element_ty)
            for s0 in range(0, n_slots, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                p = tl.load(pw_ptr + s[:, None] * DR + e[None, :], mask=(s < n_slots)[:, None] & em[None, :],
                            other=0.0)
                acc += tl.sum(p, axis=0)
            tl.store(dW_ptr + e, acc.to(dW_ptr.dtype.element_ty), mask=em)
        else:  # gate gradients: per head, sum over its column blocks
            hh = tl.arange(0, BLOCK_H)
            hm = hh < H
            a0 = tl.zeros([BLOCK_H], dtype=ps_ptr.dtype.element_ty)
            a1 = tl.zeros([BLOCK_H], dtype=ps_ptr.dtype.element_ty)
            a2 = tl.zeros([BLOCK_H], dtype=ps_ptr.dtype.element_ty)
            a3 = tl.zeros([BLOCK_H], dtype=ps_ptr.dtype.element_ty)
            for j0 in range(0, n_per_head, BLOCK_J):
                jj = j0 + tl.arange(0, BLOCK_J)
                mm = hm[:, None] & (jj < n_per_head)[None, :]
                base = ps_ptr + (hh[:, None] * n_per_head + jj[None, :]) * 4
                a0 += tl.sum(tl.load(base + 0, mask=mm, other=0.0), axis=1)
                a1 += tl.sum(tl.load(base + 1, mask=mm, other=0.0), axis=1)
                a2 += tl.sum(tl.load(base + 2, mask=mm, other=0.0), axis=1)
                a3 += tl.sum(tl.load(base + 3, mask=mm, other=0.0), axis=1)
            if GATES == 0:  # the four sides' gradients
                tl.store(d0_ptr + hh, a0.to(d0_ptr.dtype.element_ty), mask=hm)
                tl.store(d1_ptr + hh, a1.to(d1_ptr.dtype.element_ty), mask=hm)
                tl.store(d2_ptr + hh, a2.to(d2_ptr.dtype.element_ty), mask=hm)
                tl.store(d3_ptr + hh, a3.to(d3_ptr.dtype.element_ty), mask=hm)
            elif GATES == 1:  # signed: qs = w_std, qr = w_rec (the K sides are constants)
                tl.store(d0_ptr + hh, a0.to(d0_ptr.dtype.element_ty), mask=hm)
                tl.store(d2_ptr + hh, a2.to(d2_ptr.dtype.element_ty), mask=hm)
            else:  # seed: both sides s = sqrt(max(w, 1e-8)): dw = (dqs + dks) / (2 s) where w >= 1e-8, else 0
                w0 = tl.load(g0 + hh, mask=hm, other=1.0).to(a0.dtype)
                w2 = tl.load(g2 + hh, mask=hm, other=1.0).to(a0.dtype)
                side0 = tl.sqrt(tl.maximum(w0, 1e-8))  # (names distinct from the loop variables above: Triton
                side2 = tl.sqrt(tl.maximum(w2, 1e-8))  # types a name once across both branches)
                dw0 = tl.where(w0 >= 1e-8, (a0 + a1) * 0.5 / side0, 0.0)
                dw2 = tl.where(w2 >= 1e-8, (a2 + a3) * 0.5 / side2, 0.0)
                tl.store(d0_ptr + hh, dw0.to(d0_ptr.dtype.element_ty), mask=hm)
                tl.store(d2_ptr + hh, dw2.to(d2_ptr.dtype.element_ty), mask=hm)


def _kernels() -> dict:
    if not triton_available():
        raise RuntimeError(f"the fused fold needs Triton, which failed to import ({_TRITON_ERROR})")
    return {"fwd": _fold_fwd_kernel, "bwd": _fold_bwd_kernel, "reduce": _fold_bwd_reduce_kernel}


def _launcher(kernel, traceable: bool, *tensors):
    """``wrap_triton(kernel)`` inside the triton_op while tracing (so torch.compile sees the kernel), else a direct
    launcher of the compiled kernel (eager calls: no per-launch higher-order-op overhead, see
    ``kernels.eager_launch``, and no ``JITFunction.run``, see ``kernels.launch``).

    Under the interpreter (CPU tests) the op is an opaque ``custom_op`` whose fake implementation is this same
    body: the launch is skipped when the tensors are fake (shape propagation only needs the allocations).
    """
    if _interpreting():
        return _InterpretedLaunch(kernel)
    if traceable and not eager_launch(*tensors):
        return torch.library.wrap_triton(kernel)
    return direct(kernel)


class _InterpretedLaunch:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake

            if any(isinstance(a, Tensor) and is_fake(a) for a in args):
                return None
            return self.kernel[grid](*args, **kwargs)

        return run


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------------

def _config(D: int, R: int, C: int, block_c: Optional[int] = None, num_warps: Optional[int] = None,
            bwd: bool = False, block_d: Optional[int] = None, wide: bool = True) -> dict:
    """Tile sizes. ``BLOCK_D``/``BLOCK_R`` are padded to powers of two >= 16 (``tl.dot``'s minimum).

    Forward: one program per (head, column block) for the Q/K rows, holding all D rows (it reduces over them for
    ``W^T Wk``), and one per (head, column block) copying the V rows. Backward: one program per (head, column
    block, d-block) for the Q/K rows, one per (head, column block, d-block) copying the V rows' gradient.
    History (H100, GPT-2 small, ncu): the first backward kept V and both Q/K sides in 2-warp programs
    (255 registers, spilling; 18.7 us for ~10 MB); the V copy now has its own programs and the Q/K code is
    ordered side by side. ``RA_FOLD_BWD_TILES="BLOCK_D,BLOCK_C,num_warps"`` overrides the backward tiles when a
    dot operand is fp32 (``wide``), ``RA_FOLD_BWD_TILES_16`` when all are 16-bit (``scripts/gpu_suite.sh`` sets
    both from the sweep in ``tests/test_gpu_fold.py``).
    """
    full_d = max(16, _next_pow2(D))
    block_r = max(16, _next_pow2(R))
    if _interpreting():  # the interpreter runs each program in numpy: small tiles
        bd, bc, nw = (16 if bwd else full_d), 16, 1
    elif bwd:  # fastest of the sweep on an H100 (benchmarks/results/h100/fold_bench.json): 12.5 / 8.3 us
        bd, bc, nw = (min(full_d, 64), 64, 4) if wide else (16, 64, 2)
    else:  # 4.7 us at D = 64 (BLOCK_C = 32), the sweep's best
        bd, bc, nw = full_d, min(64, max(16, 2048 // full_d)), 4
    env = "RA_FOLD_BWD_TILES" if wide else "RA_FOLD_BWD_TILES_16"
    if bwd and not _interpreting() and os.environ.get(env):
        bd, bc, nw = (int(v) for v in os.environ[env].split(","))
    bd = block_d or bd
    bc = block_c or bc
    if not bwd and bd != full_d:
        raise ValueError(f"the forward fold needs BLOCK_D >= D (got block_d={bd}, D={D})")
    return {"BLOCK_D": bd, "BLOCK_R": block_r, "BLOCK_C": bc, "num_warps": num_warps or nw,
            "n_cb": -(-C // bc), "n_db": -(-D // bd)}


_REDUCE_MAX_S = 256  # slots summed per loop iteration of the reduction (a test lowers these to run the loops)
_REDUCE_MAX_J = 64

#: Gate forms the kernels understand: the four sides given as tensors, or computed in the kernel from the raw
#: gate parameters ``w_std, w_rec`` (``reference.gate_sides``), which saves the small elementwise kernels (and
#: their backward) that forming the sides in PyTorch launches on every call.
GATE_MODES = {"sides": 0, "signed": 1, "seed": 2}


def _dummy(t: Tensor) -> Tensor:
    return t  # any tensor: the kernel never dereferences a pointer whose constexpr flag is off


def _route(routed: Optional[Tensor], threshold: Optional[float]) -> int:
    return 1 if routed is not None else (2 if threshold is not None else 0)


def _ieee(*tensors: Tensor) -> bool:
    """IEEE fp32 dots unless every dot operand is 16-bit: tf32 holds bf16/fp16 values exactly (and their products
    are exact in fp32), so tensor cores then give the IEEE result; fp32 operands would be rounded to tf32."""
    return any(t.dtype in (torch.float32, torch.float64) for t in tensors)


# ---------------------------------------------------------------------------------------------------------------
# Implementations (the bodies of the custom ops; also called directly by the fallback autograd.Function)
# g0..g3 are the four gate sides (gate_mode "sides"), or g0 = w_std, g2 = w_rec and g1 = g3 = None.
# ---------------------------------------------------------------------------------------------------------------

def _fold_forward_impl(weight: Tensor, bias: Optional[Tensor], W: Tensor, g0: Tensor, g1: Optional[Tensor],
                       g2: Tensor, g3: Optional[Tensor], routed: Optional[Tensor], n_head: int, variant: str,
                       out_dtype: torch.dtype, gate_mode: int = 0, threshold: Optional[float] = None,
                       bias_channel: bool = False, traceable: bool = True, block_c: Optional[int] = None,
                       num_warps: Optional[int] = None) -> tuple[Tensor, Tensor]:
    C = weight.shape[1]
    H = n_head
    D = C // H
    R = W.shape[1]
    ds, dp = std_width(variant, D, R, bias_channel), folded_width(variant, D, R)
    rows = 2 * H * dp + C
    out_w = torch.empty((rows, C), dtype=out_dtype, device=weight.device)
    out_b = torch.empty((rows if bias is not None else 0,), dtype=out_dtype, device=weight.device)
    cfg = _config(D, R, C, block_c, num_warps)
    grid = (H, cfg["n_cb"] + (1 if bias is not None else 0), 2)
    _launcher(_kernels()["fwd"], traceable, weight)[grid](
        weight, bias if bias is not None else _dummy(weight), W, g0, g1 if g1 is not None else g0, g2,
        g3 if g3 is not None else g2, routed if routed is not None else _dummy(g0),
        float(threshold) if threshold is not None else 0.0,
        out_w, out_b if bias is not None else _dummy(out_w),
        C, H, D, R, ds, dp,
        HAS_BIAS=bias is not None, GATES=gate_mode, ROUTE=_route(routed, threshold),
        LOW_RANK=variant == "low_rank", FP64=weight.dtype == torch.float64, IEEE=_ieee(weight, W),
        BLOCK_D=cfg["BLOCK_D"], BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_CB=16,
        num_warps=cfg["num_warps"])
    return out_w, out_b


def _fold_backward_impl(grad_w: Tensor, grad_b: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                        W: Tensor, g0: Tensor, g1: Optional[Tensor], g2: Tensor, g3: Optional[Tensor],
                        routed: Optional[Tensor], n_head: int, variant: str, gate_mode: int = 0,
                        threshold: Optional[float] = None, bias_channel: bool = False, traceable: bool = True,
                        block_c: Optional[int] = None,
                        num_warps: Optional[int] = None,
                        block_d: Optional[int] = None, stream=None,
                        between: Optional[Callable[[], Optional[Tensor]]] = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(d_weight, d_bias, dW, dg0, dg1, dg2, dg3)``; ``dg1``/``dg3`` are empty in the gated modes.

    ``stream`` and/or ``between``: launch the kernels on ``stream`` (None: the current one) in two parts. The
    programs of the weight's columns go first and read only ``grad_w``; then ``between()`` runs on the current
    stream and returns ``grad_b`` (it computes it and makes ``stream`` wait for it); then the bias column's
    programs and the reduction. Everything is allocated on the current stream before the first launch; the caller
    makes the current stream wait for ``stream`` before it uses the results and before it allocates anything more
    on the current stream (the temporaries are freed on return while ``stream`` may still use them).
    ``kernels.folded_linear`` overlaps the fold backward with the GEMM's own backward this way."""
    C = weight.shape[1]
    H = n_head
    D = C // H
    R = W.shape[1]
    ds, dp = std_width(variant, D, R, bias_channel), folded_width(variant, D, R)
    fp64 = weight.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    has_bias = bias is not None
    ieee = _ieee(grad_w, weight, W)
    cfg = _config(D, R, C, block_c, num_warps, bwd=True, block_d=block_d, wide=ieee)
    n_per_head = cfg["n_cb"] + (1 if has_bias else 0)
    n_slots = H * n_per_head
    n_db = cfg["n_db"]
    dev = weight.device
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    d_bias = torch.empty((3 * C if has_bias else 0,), dtype=bias.dtype if has_bias else weight.dtype, device=dev)
    pw = torch.empty((n_slots, D, R), dtype=acc, device=dev)
    ps = torch.empty((n_slots * n_db, 4), dtype=acc, device=dev)
    dW = torch.empty_like(W, memory_format=torch.contiguous_format)
    # absent gate sides (gated modes) get no gradient: None eagerly, an empty tensor for the op's schema
    dg = [torch.empty_like(g, memory_format=torch.contiguous_format) if g is not None
          else (torch.empty((0,), dtype=acc, device=dev) if traceable else None) for g in (g0, g1, g2, g3)]
    g1_ = g1 if g1 is not None else g0
    g3_ = g3 if g3 is not None else g2
    ks_ = _kernels()
    # One reduction program per 32 entries of dW (each sums a [n_slots, 32] strip, one load round trip when
    # n_slots <= 256) and one for the gates.
    block_e = 32
    n_e = -(-(D * R) // block_e)

    def tiles(j0: int, n_j: int, grad_b: Optional[Tensor]) -> None:
        _launcher(ks_["bwd"], traceable, grad_w)[(H, n_j, 2 * n_db)](
            grad_w, grad_b if (has_bias and grad_b is not None) else _dummy(grad_w), weight,
            bias if has_bias else _dummy(weight), W, g0, g1_, g2, g3_,
            routed if routed is not None else _dummy(g0), float(threshold) if threshold is not None else 0.0,
            d_weight, d_bias if has_bias else _dummy(d_weight), pw, ps,
            C, H, D, R, ds, dp, j0,
            HAS_BIAS=has_bias, GATES=gate_mode, ROUTE=_route(routed, threshold), FP64=fp64,
            IEEE=ieee, BLOCK_D=cfg["BLOCK_D"],
            BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_CB=16, num_warps=cfg["num_warps"])

    def reduce() -> None:
        _launcher(ks_["reduce"], traceable, pw)[(n_e + 1,)](
            pw, ps, dW, g0, g2, dg[0], dg[1] if g1 is not None else dg[0], dg[2],
            dg[3] if g3 is not None else dg[2],
            n_slots, n_per_head * n_db, H, D * R, GATES=gate_mode,
            BLOCK_E=block_e, BLOCK_S=min(_REDUCE_MAX_S, max(16, _next_pow2(n_slots))),
            BLOCK_H=max(16, _next_pow2(H)), BLOCK_J=min(_REDUCE_MAX_J, max(16, _next_pow2(n_per_head * n_db))),
            num_warps=1 if _interpreting() else 4)

    if between is None and stream is None:
        tiles(0, n_per_head, grad_b)
        reduce()
    else:  # torch.cuda.stream(None) is a no-op (the interpreter tests run this split on CPU)
        n_cb = cfg["n_cb"]
        with torch.cuda.stream(stream):
            tiles(0, n_cb, None)
        grad_b = between() if between is not None else grad_b
        with torch.cuda.stream(stream):
            if has_bias:
                tiles(n_cb, 1, grad_b)
            reduce()
    return d_weight, d_bias, dW, dg[0], dg[1], dg[2], dg[3]


# ---------------------------------------------------------------------------------------------------------------
# Custom ops + autograd
# ---------------------------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    weight, bias, W, g0, g1, g2, g3, routed, n_head, variant, gate_mode, threshold, bias_channel, out_dtype = inputs
    ctx.save_for_backward(weight, bias, W, g0, g1, g2, g3, routed)
    ctx.n_head = n_head
    ctx.variant = variant
    ctx.gate_mode = gate_mode
    ctx.threshold = threshold
    ctx.bias_channel = bias_channel


_fold_op = None
_fold_bwd_op = None
_FALLBACK_REASON: Optional[str] = None


def _zero_grads(ctx, grad_w: Optional[Tensor], grad_b: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                W: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Materialise missing output gradients (an unused output) as zeros."""
    C = weight.shape[1]
    D = C // ctx.n_head
    rows = 2 * ctx.n_head * folded_width(ctx.variant, D, W.shape[1]) + C
    if grad_w is None:
        grad_w = weight.new_zeros((rows, C))
    if bias is not None and (grad_b is None or grad_b.numel() == 0):
        grad_b = bias.new_zeros((rows,))
    return grad_w.contiguous(), (grad_b.contiguous() if bias is not None else None)


def _input_grads(bias, g1, g3, grads) -> tuple:
    dw, db, dW, d0, d1, d2, d3 = grads
    return (dw, (db if bias is not None else None), dW, d0, (d1 if g1 is not None else None), d2,
            (d3 if g3 is not None else None), None, None, None, None, None, None, None, None)


def _register_ops() -> None:
    global _fold_op, _fold_bwd_op, _FALLBACK_REASON
    if not (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
            and hasattr(torch.library, "register_autograd")):
        _FALLBACK_REASON = (f"torch {torch.__version__} has no torch.library.triton_op/wrap_triton (torch >= 2.6); "
                            "using a plain autograd.Function (works eagerly, graph-breaks under torch.compile)")
        log.warning("fused fold: %s", _FALLBACK_REASON)
        return
    ns = getattr(torch.ops, _OP_NAMESPACE)
    try:  # re-import of this module (e.g. importlib.reload): reuse the registered ops
        _fold_op, _fold_bwd_op = ns.fold_qkv, ns.fold_qkv_backward
        return
    except (AttributeError, RuntimeError):
        pass
    if _interpreting():
        # The interpreter runs kernels in numpy; wrap_triton cannot trace them. An opaque custom_op keeps the
        # schema, autograd and torch.compile behaviour testable on CPU (fake impl = the body, launches skipped).
        def make_op(name):
            def dec(fn):
                op = torch.library.custom_op(name, mutates_args=())(fn)
                op.register_fake(fn)
                return op
            return dec
    else:
        def make_op(name):
            return torch.library.triton_op(name, mutates_args=())

    @make_op(f"{_OP_NAMESPACE}::fold_qkv_backward")
    def fold_qkv_backward(grad_w: Tensor, grad_b: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                          W: Tensor, g0: Tensor, g1: Optional[Tensor], g2: Tensor, g3: Optional[Tensor],
                          routed: Optional[Tensor], n_head: int, variant: str, gate_mode: int,
                          threshold: Optional[float], bias_channel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                    Tensor, Tensor, Tensor]:
        return _fold_backward_impl(grad_w, grad_b, weight, bias, W, g0, g1, g2, g3, routed, n_head, variant,
                                   gate_mode, threshold, bias_channel)

    @make_op(f"{_OP_NAMESPACE}::fold_qkv")
    def fold_qkv(weight: Tensor, bias: Optional[Tensor], W: Tensor, g0: Tensor, g1: Optional[Tensor], g2: Tensor,
                 g3: Optional[Tensor], routed: Optional[Tensor], n_head: int, variant: str, gate_mode: int,
                 threshold: Optional[float], bias_channel: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return _fold_forward_impl(weight, bias, W, g0, g1, g2, g3, routed, n_head, variant, out_dtype, gate_mode,
                                  threshold, bias_channel)

    def backward(ctx, grad_w, grad_b):
        weight, bias, W, g0, g1, g2, g3, routed = ctx.saved_tensors
        grad_w, grad_b = _zero_grads(ctx, grad_w, grad_b, weight, bias, W)
        grads = fold_qkv_backward(grad_w, grad_b, weight, bias, W, g0, g1, g2, g3, routed, ctx.n_head,
                                  ctx.variant, ctx.gate_mode, ctx.threshold, ctx.bias_channel)
        return _input_grads(bias, g1, g3, grads)

    fold_qkv.register_autograd(backward, setup_context=_setup_context)
    _fold_op, _fold_bwd_op = fold_qkv, fold_qkv_backward


class _FoldFunction(torch.autograd.Function):
    """Fallback for torch without ``triton_op``: the same kernels behind a plain autograd.Function."""

    @staticmethod
    def forward(ctx, weight, bias, W, g0, g1, g2, g3, routed, n_head, variant, gate_mode, threshold, bias_channel,
                out_dtype, reuse=None):
        if reuse is not None:  # the fold of these exact parameter values, made earlier: no kernel forward
            out = tuple(t.view_as(t) for t in reuse)
        else:
            out = _fold_forward_impl(weight, bias, W, g0, g1, g2, g3, routed, n_head, variant, out_dtype, gate_mode,
                                     threshold, bias_channel, traceable=False)
        _setup_context(ctx, (weight, bias, W, g0, g1, g2, g3, routed, n_head, variant, gate_mode, threshold,
                             bias_channel, out_dtype), out)
        return out

    @staticmethod
    @once_differentiable  # Triton kernels have no backward: a double backward raises instead of misleading
    def backward(ctx, grad_w, grad_b):
        weight, bias, W, g0, g1, g2, g3, routed = ctx.saved_tensors
        grad_w, grad_b = _zero_grads(ctx, grad_w, grad_b, weight, bias, W)
        grads = _fold_backward_impl(grad_w, grad_b, weight, bias, W, g0, g1, g2, g3, routed, ctx.n_head,
                                    ctx.variant, ctx.gate_mode, ctx.threshold, ctx.bias_channel, traceable=False)
        return _input_grads(bias, g1, g3, grads)


_register_ops()


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

def _fail(msg: str):
    raise ValueError(f"fused_fold_qkv_weight: {msg}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_inputs(weight, bias, W, gates, routed, n_head, variant, out_dtype,
                  gate_names=("qs", "ks", "qr", "kr"), bias_channel=False) -> None:
    """Clear errors for bad inputs (messages are formatted only on failure: this runs on every call)."""
    if not (isinstance(weight, Tensor) and weight.dim() == 2):
        _fail(f"weight must be a 2-D tensor [3C, C]; got {_shape(weight)}")
    C = weight.shape[1]
    if weight.shape[0] != 3 * C:
        _fail(f"weight must have shape [3C, C]; got {_shape(weight)}")
    if not (isinstance(n_head, int) and n_head >= 1):
        _fail(f"n_head must be a positive int; got {n_head!r}")
    if C % n_head:
        _fail(f"n_head={n_head} must divide C={C}")
    if variant not in FOLDED_VARIANTS:
        _fail(f"variant must be one of {FOLDED_VARIANTS}; got {variant!r}")
    D = C // n_head
    if not (isinstance(W, Tensor) and W.dim() == 2 and W.shape[0] == D):
        _fail(f"W must have shape [D, R] with D = C / n_head = {D}; got {_shape(W)}")
    R = W.shape[1]
    if not 1 <= R <= D - 1:
        _fail(f"R = W.shape[1] must be in [1, D-1] = [1, {D - 1}]; got {R}")
    if bias_channel and (variant != "same_flop" or R > D - 2 or routed is not None):
        _fail(f"bias_channel needs variant 'same_flop', R <= D-2 = {D - 2} and no routing; got variant={variant!r}, "
              f"R={R}, routed={'set' if routed is not None else None}")
    dev = weight.device
    named = (("weight", weight), ("W", W), ("bias", bias)) + tuple(zip(gate_names, gates))
    for name, t in named:
        if t is None and name in ("bias", "-"):
            continue
        if not isinstance(t, Tensor):
            _fail(f"{name} must be a tensor; got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            _fail(f"{name} must be float32/bfloat16/float16/float64; got {t.dtype}")
        if t.device != dev:
            _fail(f"{name} is on {t.device} but weight is on {dev}")
        if name in ("weight", "W", "bias") and not t.is_contiguous():
            _fail(f"{name} must be contiguous")
        if name not in ("weight", "W", "bias") and not (t.dim() == 1 and t.shape[0] == n_head):
            _fail(f"{name} must have shape [n_head] = [{n_head}]; got {_shape(t)}")
    if bias is not None and not (bias.dim() == 1 and bias.shape[0] == 3 * C):
        _fail(f"bias must have shape [3C] = [{3 * C}]; got {_shape(bias)}")
    if routed is not None:
        if not (isinstance(routed, Tensor) and routed.dtype == torch.bool):
            _fail("routed must be a bool tensor or None")
        if routed.dim() != 1 or routed.shape[0] != n_head:
            _fail(f"routed must have shape [n_head] = [{n_head}]; got {_shape(routed)}")
        if routed.device != dev:
            _fail(f"routed is on {routed.device} but weight is on {dev}")
    if out_dtype not in _FLOAT_DTYPES:
        _fail(f"out_dtype must be float32/bfloat16/float16/float64; got {out_dtype}")
    if dev.type != "cuda" and not _interpreting():
        _fail(f"the fused fold runs on CUDA tensors (or any device with TRITON_INTERPRET=1); got {dev}")


def _need_triton() -> None:
    if not triton_available():
        raise RuntimeError(f"the fused fold needs Triton, which failed to import ({_TRITON_ERROR}); "
                           "use reciprocal_attention.fold.fold_qkv_weight instead")


def _apply(weight, bias, W, g0, g1, g2, g3, routed, n_head, variant, gate_mode, threshold, bias_channel,
           out_dtype, reuse=None):
    # The custom op only while tracing (torch.compile must see it); eagerly the same kernels behind a plain
    # autograd.Function: the custom-op dispatch costs host time on every call (measured on CPU with the launches
    # stubbed out: 2.1 ms vs 0.68 ms per fwd+bwd at GPT-2 small sizes).
    traced = _fold_op is not None and not eager_launch(weight)
    if reuse is not None:
        _check_reuse(reuse, weight, bias, W, n_head, variant, out_dtype, traced, "reuse")
        reuse = (reuse[0], reuse[1] if reuse[1] is not None else reuse[0].new_empty((0,)))
    if traced:
        w, b = _fold_op(weight, bias, W, g0, g1, g2, g3, routed, n_head, variant, gate_mode, threshold,
                        bias_channel, out_dtype)
    else:
        w, b = _FoldFunction.apply(weight, bias, W, g0, g1, g2, g3, routed, n_head, variant, gate_mode, threshold,
                                   bias_channel, out_dtype, reuse)
    return w, (b if bias is not None else None)


def _check_reuse(reuse, weight, bias, W, n_head, variant, out_dtype, traced, arg: str) -> None:
    """``reuse`` (called ``arg`` by the caller) must be a fold these parameters could have made."""
    if traced:
        _fail(f"{arg} is for eager calls (a traced graph recomputes the fold); pass {arg}=None under torch.compile")
    if not (isinstance(reuse, tuple) and len(reuse) == 2 and isinstance(reuse[0], Tensor)):
        _fail(f"{arg} must be a tuple (folded_weight, folded_bias or None); got {type(reuse).__name__}")
    C, D = weight.shape[1], weight.shape[1] // n_head
    rows = 2 * n_head * folded_width(variant, D, W.shape[1]) + C
    for name, t, shape in ((f"{arg}[0]", reuse[0], (rows, C)),
                           (f"{arg}[1]", reuse[1], (rows,) if bias is not None else None)):
        if shape is None:
            if t is not None:
                _fail(f"{arg}[1] must be None when bias is None")
            continue
        if not (isinstance(t, Tensor) and tuple(t.shape) == shape and t.dtype == out_dtype
                and t.device == weight.device):
            _fail(f"{name} must be a {out_dtype} tensor of shape {list(shape)} on {weight.device}; got "
                  f"{_shape(t)}" + (f" {t.dtype} on {t.device}" if isinstance(t, Tensor) else ""))


def fused_fold_qkv_weight(weight: Tensor, bias: Optional[Tensor], W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor,
                          kr: Tensor, routed: Optional[Tensor], n_head: int, variant: str,
                          out_dtype: Optional[torch.dtype] = None,
                          bias_channel: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Fused :func:`reciprocal_attention.fold.fold_qkv_weight`: ``[3C, C]`` (+ ``[3C]``) -> ``[2 H D' + C, C]``.

    One Triton kernel forward, two backward (deterministic). Differentiable in ``weight, bias, W, qs, ks, qr,
    kr`` (not ``routed``). ``out_dtype`` (default ``weight.dtype``) is the dtype of the folded weight and bias;
    arithmetic is fp32 (fp64 for fp64 weights). Gradients come back in each parameter's own dtype.
    ``bias_channel``: reserve each head's last Q/K feature (zero rows) for the column bias, as the oracle does.
    Raises ``RuntimeError`` without Triton and ``ValueError`` on bad inputs.
    """
    _need_triton()
    gates = (qs, ks, qr, kr)
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    _check_inputs(weight, bias, W, gates, routed, n_head, variant, out_dtype, bias_channel=bias_channel)
    qs, ks, qr, kr = (g.contiguous() for g in gates)
    if routed is not None:
        routed = routed.contiguous()
    return _apply(weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, GATE_MODES["sides"], None,
                  bias_channel, out_dtype)


def _check_gated(weight, bias, W, w_std, w_rec, n_head, variant, gates, routing_threshold, out_dtype,
                 bias_channel) -> tuple[torch.dtype, Optional[float]]:
    """The checks of the raw-gate entry points (:func:`fused_fold_gated`, ``folded_linear.fused_folded_linear``);
    returns ``(out_dtype, threshold)`` resolved."""
    _need_triton()
    if gates not in ("signed", "seed"):
        _fail(f"gates must be 'signed' or 'seed'; got {gates!r}")
    if routing_threshold is not None and not isinstance(routing_threshold, (int, float)):
        _fail(f"routing_threshold must be a float or None; got {type(routing_threshold).__name__}")
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    if bias_channel and routing_threshold is not None:
        _fail("bias_channel does not combine with routing (a routed head would use every feature)")
    _check_inputs(weight, bias, W, (w_std, w_rec), None, n_head, variant, out_dtype, gate_names=("w_std", "w_rec"),
                  bias_channel=bias_channel)
    return out_dtype, (float(routing_threshold) if routing_threshold is not None else None)


def fused_fold_gated(weight: Tensor, bias: Optional[Tensor], W: Tensor, w_std: Tensor, w_rec: Tensor,
                     n_head: int, variant: str, gates: str = "signed", routing_threshold: Optional[float] = None,
                     out_dtype: Optional[torch.dtype] = None, bias_channel: bool = False,
                     reuse: Optional[tuple[Tensor, Optional[Tensor]]] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The fold from the raw gate parameters: ``fused_fold_qkv_weight(weight, bias, W, *gate_sides(w_std),
    *gate_sides(w_rec), routed_heads(w_rec, routing_threshold), ...)`` with the sides and the routing formed
    inside the kernels (``gates`` = ``"signed"`` or ``"seed"``), so no other kernel runs forward or backward.
    Gradients flow to ``weight, bias, W, w_std, w_rec``.

    ``reuse``: ``(folded_weight, folded_bias)`` made earlier by this function from these exact parameter values
    (the caller owns that promise, e.g. a cache keyed on version counters). The forward then returns views of them
    and launches nothing; the backward still maps the gradient back. Eager calls only.
    """
    out_dtype, thr = _check_gated(weight, bias, W, w_std, w_rec, n_head, variant, gates, routing_threshold,
                                  out_dtype, bias_channel)
    return _apply(weight, bias, W, w_std.contiguous(), None, w_rec.contiguous(), None, None, n_head, variant,
                  GATE_MODES[gates], thr, bias_channel, out_dtype, reuse)


__all__ = ["fused_fold_qkv_weight", "fused_fold_gated", "triton_available", "GATE_MODES"]
