"""Fused weight-space fold (RA-SPEC 3.2, GitHub issue 3): one kernel builds the folded ``c_attn`` weight, two map
its gradient back.

:func:`fused_fold_qkv_weight` has the semantics and output layout of
:func:`reciprocal_attention.fold.fold_qkv_weight` (the readable oracle); read that first. Per head ``h``::

    Wq~^h = [ qs_h Wq^h[:Ds] ; qr_h W^T Wk^h ]        Wk~^h = [ ks_h Wk^h[:Ds] ; kr_h W^T Wq^h ]

(bias likewise, as if it were column ``C`` of the weight); a routed head takes ``qs_h Wq^h`` / ``ks_h Wk^h`` over
the full ``D`` (and zero reciprocal rows for ``low_rank``); the V rows are copied. The output is one contiguous
``[2 H D' + C, C]`` tensor in ``out_dtype``: under autocast pass ``torch.bfloat16`` and the fold replaces the
fp32 -> bf16 cast that ``F.linear`` would run on ``weight`` anyway.

Kernels
-------
* ``_fold_fwd_kernel``, grid ``(H, n_cb + has_bias)``: program ``(h, j)`` loads the ``[D, BLOCK_C]`` tiles of
  ``Wq^h``, ``Wk^h`` (columns ``j*BLOCK_C ...``; the extra block ``j == n_cb`` reads the bias as one column),
  forms ``W^T Wk^h`` and ``W^T Wq^h`` with two ``tl.dot`` (``R`` padded to 16, IEEE fp32), writes the ``D'`` rows
  of ``Q~^h`` and ``K~^h`` and copies (casts) the ``D`` rows of ``V^h``. Every output element is written once.
* ``_fold_bwd_kernel``, same grid: program ``(h, j)`` loads the tiles of ``dQ~^h``, ``dK~^h``, ``dV^h``, ``Wq^h``,
  ``Wk^h``, writes ``dWq^h``, ``dWk^h``, ``dWv^h`` for its columns (``qs dQ~[:Ds] + kr W dK~[Ds:]`` etc.) and
  stores fp32 partials: ``qr Wk^h dQ~[Ds:]^T + kr Wq^h dK~[Ds:]^T`` (``[D, R]``, for ``dW``) and the four gate
  partials (``sum Wq*dQ~`` over the std rows, ``sum Wk*dK~``, ``sum W * (Wk dQ~[Ds:]^T)``, ``sum W * (Wq dK~[Ds:]^T)``)
  into ``[H * (n_cb + has_bias), ...]`` buffers.
* ``_fold_bwd_reduce_kernel``: sums the partials in a fixed order (no atomics anywhere, so two runs give
  bitwise-equal gradients) and writes ``dW`` and ``dqs, dks, dqr, dkr`` in their parameters' dtypes.

Registered as the custom ops ``reciprocal_attention::fold_qkv`` and ``reciprocal_attention::fold_qkv_backward``
(``torch.library.triton_op``, torch >= 2.6) so the fold works under ``torch.compile(fullgraph=True)`` and inside
CUDA graphs; on older torch a plain ``autograd.Function`` is used instead (the reason is logged). Under the
Triton interpreter (``TRITON_INTERPRET=1`` when this module is imported: the CPU tests) the same bodies are
registered as opaque ``torch.library.custom_op``s instead, as ``wrap_triton`` cannot trace interpreted kernels.
Triton is imported guarded: importing this module never fails, calling the fold without Triton raises
``RuntimeError``. Arithmetic is fp32 (fp64 for fp64 weights), ``tl.dot`` in IEEE precision (no TF32).
Not twice differentiable.
"""

import logging
import os
from typing import Optional

import torch
from torch import Tensor

from ..fold import FOLDED_VARIANTS, folded_width, std_width
from . import INTERPRET

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
    def _fwd_tile(src, dst, W_ptr, row_stride, n_cols, c0, h, rt, qs, ks, qr, kr, C, H, D, R, DS, DP,
                  COL_STRIDE: tl.constexpr, LOW_RANK: tl.constexpr, FP64: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        d = tl.arange(0, BLOCK_D)
        r = tl.arange(0, BLOCK_R)
        c = c0 + tl.arange(0, BLOCK_C)
        dm = d < D
        cm = c < n_cols
        m = dm[:, None] & cm[None, :]
        col = c[None, :] * COL_STRIDE
        out_ty = dst.dtype.element_ty
        # V^h: copy (cast) straight through.
        wv = tl.load(src + ((2 * C + h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        tl.store(dst + ((2 * H * DP + h * D + d) * row_stride)[:, None] + col, wv.to(out_ty), mask=m)
        wq = tl.load(src + ((h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        wk = tl.load(src + ((C + h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        wt = tl.load(W_ptr + d[None, :] * R + r[:, None], mask=(r < R)[:, None] & dm[None, :], other=0.0)
        if FP64:
            wq = wq.to(tl.float64)
            wk = wk.to(tl.float64)
            wt = wt.to(tl.float64)
        else:
            wq = wq.to(tl.float32)
            wk = wk.to(tl.float32)
            wt = wt.to(tl.float32)
        # Standard rows: the first Ds rows, all D rows of a routed head.
        sm = (d < DS + rt * (D - DS))[:, None] & cm[None, :]
        tl.store(dst + ((h * DP + d) * row_stride)[:, None] + col, (qs * wq).to(out_ty), mask=sm)
        tl.store(dst + ((H * DP + h * DP + d) * row_stride)[:, None] + col, (ks * wk).to(out_ty), mask=sm)
        # Reciprocal rows Ds .. Ds+R: W^T Wk^h (Q~) and W^T Wq^h (K~); zero for a routed low_rank head, and not
        # written for a routed same_flop head (its std rows cover them).
        live = rt == 0
        if LOW_RANK:
            rm = (r < R)[:, None] & cm[None, :]
        else:
            rm = ((r < R) & live)[:, None] & cm[None, :]
        rq = tl.dot(wt, wk, input_precision="ieee")
        tl.store(dst + ((h * DP + DS + r) * row_stride)[:, None] + col,
                 tl.where(live, qr * rq, 0.0).to(out_ty), mask=rm)
        rk = tl.dot(wt, wq, input_precision="ieee")
        tl.store(dst + ((H * DP + h * DP + DS + r) * row_stride)[:, None] + col,
                 tl.where(live, kr * rk, 0.0).to(out_ty), mask=rm)

    # Only C (the row stride) is worth specializing (16-divisibility -> vectorized rows); not specializing the other
    # sizes saves recompiles across shapes.
    @triton.jit(do_not_specialize=["H", "D", "R", "DS", "DP"])
    def _fold_fwd_kernel(w_ptr, b_ptr, W_ptr, qs_ptr, ks_ptr, qr_ptr, kr_ptr, routed_ptr, ow_ptr, ob_ptr,
                         C, H, D, R, DS, DP,
                         HAS_BIAS: tl.constexpr, HAS_ROUTED: tl.constexpr, LOW_RANK: tl.constexpr,
                         FP64: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_CB: tl.constexpr):
        h = tl.program_id(0)
        j = tl.program_id(1)
        if FP64:
            qs = tl.load(qs_ptr + h).to(tl.float64)
            ks = tl.load(ks_ptr + h).to(tl.float64)
            qr = tl.load(qr_ptr + h).to(tl.float64)
            kr = tl.load(kr_ptr + h).to(tl.float64)
        else:
            qs = tl.load(qs_ptr + h).to(tl.float32)
            ks = tl.load(ks_ptr + h).to(tl.float32)
            qr = tl.load(qr_ptr + h).to(tl.float32)
            kr = tl.load(kr_ptr + h).to(tl.float32)
        if HAS_ROUTED:
            rt = (tl.load(routed_ptr + h) != 0).to(tl.int32)
        else:
            rt = h * 0
        n_cb = tl.cdiv(C, BLOCK_C)
        if j < n_cb:
            _fwd_tile(w_ptr, ow_ptr, W_ptr, C, C, j * BLOCK_C, h, rt, qs, ks, qr, kr, C, H, D, R, DS, DP,
                      1, LOW_RANK, FP64, BLOCK_D, BLOCK_R, BLOCK_C)
        else:
            if HAS_BIAS:  # the bias is one more column (row stride 1)
                _fwd_tile(b_ptr, ob_ptr, W_ptr, 1, 1, 0, h, rt, qs, ks, qr, kr, C, H, D, R, DS, DP,
                          0, LOW_RANK, FP64, BLOCK_D, BLOCK_R, BLOCK_CB)

    @triton.jit
    def _bwd_tile(g_src, w_src, g_dst, W_ptr, pw_ptr, ps_ptr, slot, ps_slot, d0, row_stride, n_cols, c0, h, rt,
                  qs, ks, qr, kr, C, H, D, R, DS, DP,
                  COL_STRIDE: tl.constexpr, FP64: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # This program owns rows [d0, d0 + BLOCK_D) of head h's D rows and one column block.
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
        # dWv^h = dV~^h
        gv = tl.load(g_src + ((2 * H * DP + h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        tl.store(g_dst + ((2 * C + h * D + d) * row_stride)[:, None] + col, gv.to(out_ty), mask=m)
        gq = tl.load(g_src + ((h * DP + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        gk = tl.load(g_src + ((H * DP + h * DP + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        gqr = tl.load(g_src + ((h * DP + DS + r) * row_stride)[:, None] + col, mask=mr, other=0.0)
        gkr = tl.load(g_src + ((H * DP + h * DP + DS + r) * row_stride)[:, None] + col, mask=mr, other=0.0)
        wq = tl.load(w_src + ((h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        wk = tl.load(w_src + ((C + h * D + d) * row_stride)[:, None] + col, mask=m, other=0.0)
        Wm = tl.load(W_ptr + d[:, None] * R + r[None, :], mask=dm[:, None] & rmask[None, :], other=0.0)
        if FP64:
            gq = gq.to(tl.float64)
            gk = gk.to(tl.float64)
            gqr = gqr.to(tl.float64)
            gkr = gkr.to(tl.float64)
            wq = wq.to(tl.float64)
            wk = wk.to(tl.float64)
            Wm = Wm.to(tl.float64)
        else:
            gq = gq.to(tl.float32)
            gk = gk.to(tl.float32)
            gqr = gqr.to(tl.float32)
            gkr = gkr.to(tl.float32)
            wq = wq.to(tl.float32)
            wk = wk.to(tl.float32)
            Wm = Wm.to(tl.float32)
        live = rt == 0
        std = (d < DS + rt * (D - DS))[:, None]
        # dWq^h = [std] qs dQ~ + kr W dK~[Ds:];  dWk^h = [std] ks dK~ + qr W dQ~[Ds:]
        dq = tl.where(std, qs * gq, 0.0) + tl.where(live, kr * tl.dot(Wm, gkr, input_precision="ieee"), 0.0)
        tl.store(g_dst + ((h * D + d) * row_stride)[:, None] + col, dq.to(out_ty), mask=m)
        dk = tl.where(std, ks * gk, 0.0) + tl.where(live, qr * tl.dot(Wm, gqr, input_precision="ieee"), 0.0)
        tl.store(g_dst + ((C + h * D + d) * row_stride)[:, None] + col, dk.to(out_ty), mask=m)
        # Partials. t1 = Wk^h dQ~[Ds:]^T and t2 = Wq^h dK~[Ds:]^T, both [D, R].
        p_qs = tl.sum(tl.sum(tl.where(std, wq * gq, 0.0), axis=1), axis=0)
        p_ks = tl.sum(tl.sum(tl.where(std, wk * gk, 0.0), axis=1), axis=0)
        t1 = tl.dot(wk, tl.trans(gqr), input_precision="ieee")
        t2 = tl.dot(wq, tl.trans(gkr), input_precision="ieee")
        p_qr = tl.where(live, tl.sum(tl.sum(Wm * t1, axis=1), axis=0), 0.0)
        p_kr = tl.where(live, tl.sum(tl.sum(Wm * t2, axis=1), axis=0), 0.0)
        pw = tl.where(live, qr * t1 + kr * t2, 0.0)
        tl.store(pw_ptr + slot * (D * R) + d[:, None] * R + r[None, :], pw.to(pw_ptr.dtype.element_ty),
                 mask=dm[:, None] & rmask[None, :])
        ps_ty = ps_ptr.dtype.element_ty
        tl.store(ps_ptr + ps_slot * 4 + 0, p_qs.to(ps_ty))
        tl.store(ps_ptr + ps_slot * 4 + 1, p_ks.to(ps_ty))
        tl.store(ps_ptr + ps_slot * 4 + 2, p_qr.to(ps_ty))
        tl.store(ps_ptr + ps_slot * 4 + 3, p_kr.to(ps_ty))

    @triton.jit(do_not_specialize=["H", "D", "R", "DS", "DP"])
    def _fold_bwd_kernel(gw_ptr, gb_ptr, w_ptr, b_ptr, W_ptr, qs_ptr, ks_ptr, qr_ptr, kr_ptr, routed_ptr,
                         dw_ptr, db_ptr, pw_ptr, ps_ptr,
                         C, H, D, R, DS, DP,
                         HAS_BIAS: tl.constexpr, HAS_ROUTED: tl.constexpr, FP64: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_CB: tl.constexpr):
        h = tl.program_id(0)
        j = tl.program_id(1)
        db = tl.program_id(2)
        slot = h * tl.num_programs(1) + j  # dW partials: rows of one slot are split over the d-blocks
        ps_slot = slot * tl.num_programs(2) + db  # gate partials: one per program
        d0 = db * BLOCK_D
        if FP64:
            qs = tl.load(qs_ptr + h).to(tl.float64)
            ks = tl.load(ks_ptr + h).to(tl.float64)
            qr = tl.load(qr_ptr + h).to(tl.float64)
            kr = tl.load(kr_ptr + h).to(tl.float64)
        else:
            qs = tl.load(qs_ptr + h).to(tl.float32)
            ks = tl.load(ks_ptr + h).to(tl.float32)
            qr = tl.load(qr_ptr + h).to(tl.float32)
            kr = tl.load(kr_ptr + h).to(tl.float32)
        if HAS_ROUTED:
            rt = (tl.load(routed_ptr + h) != 0).to(tl.int32)
        else:
            rt = h * 0
        n_cb = tl.cdiv(C, BLOCK_C)
        if j < n_cb:
            _bwd_tile(gw_ptr, w_ptr, dw_ptr, W_ptr, pw_ptr, ps_ptr, slot, ps_slot, d0, C, C, j * BLOCK_C, h, rt,
                      qs, ks, qr, kr, C, H, D, R, DS, DP, 1, FP64, BLOCK_D, BLOCK_R, BLOCK_C)
        else:
            if HAS_BIAS:
                _bwd_tile(gb_ptr, b_ptr, db_ptr, W_ptr, pw_ptr, ps_ptr, slot, ps_slot, d0, 1, 1, 0, h, rt,
                          qs, ks, qr, kr, C, H, D, R, DS, DP, 0, FP64, BLOCK_D, BLOCK_R, BLOCK_CB)

    @triton.jit(do_not_specialize=["n_slots", "n_per_head", "H", "DR"])
    def _fold_bwd_reduce_kernel(pw_ptr, ps_ptr, dW_ptr, dqs_ptr, dks_ptr, dqr_ptr, dkr_ptr,
                                n_slots, n_per_head, H, DR,
                                BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                                BLOCK_J: tl.constexpr):
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
            tl.store(dqs_ptr + hh, a0.to(dqs_ptr.dtype.element_ty), mask=hm)
            tl.store(dks_ptr + hh, a1.to(dks_ptr.dtype.element_ty), mask=hm)
            tl.store(dqr_ptr + hh, a2.to(dqr_ptr.dtype.element_ty), mask=hm)
            tl.store(dkr_ptr + hh, a3.to(dkr_ptr.dtype.element_ty), mask=hm)


def _kernels() -> dict:
    if not triton_available():
        raise RuntimeError(f"the fused fold needs Triton, which failed to import ({_TRITON_ERROR})")
    return {"fwd": _fold_fwd_kernel, "bwd": _fold_bwd_kernel, "reduce": _fold_bwd_reduce_kernel}


def _launcher(kernel, traceable: bool):
    """``wrap_triton(kernel)`` inside the triton_op (so torch.compile sees the kernel), the bare kernel otherwise.

    Under the interpreter (CPU tests) the op is an opaque ``custom_op`` whose fake implementation is this same
    body: the launch is skipped when the tensors are fake (shape propagation only needs the allocations).
    """
    if _interpreting():
        return _InterpretedLaunch(kernel)
    if traceable:
        return torch.library.wrap_triton(kernel)
    return kernel


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
            bwd: bool = False, block_d: Optional[int] = None) -> dict:
    """Tile sizes. ``BLOCK_D``/``BLOCK_R`` are padded to powers of two >= 16 (``tl.dot``'s minimum).

    Forward: one program per (head, column block) holding all D rows (it reduces over them for ``W^T Wk``).
    Backward: one program per (head, column block, d-block): measured on an H100 at GPT-2 small sizes, whole
    ``[D, BLOCK_C]`` tiles per program took 21-31 us for ~10 MB of traffic, so each head's rows are split over
    ``BLOCK_D``-row blocks. The split bought little (best 20.3 us): the backward is bound by something other than
    tile shape (to profile next: the reduction kernel vs the tile kernel). ``tests/test_gpu_fold.py`` prints a
    sweep to retune on a card.
    """
    full_d = max(16, _next_pow2(D))
    block_r = max(16, _next_pow2(R))
    if _interpreting():  # the interpreter runs each program in numpy: small tiles
        bd, bc, nw = (16 if bwd else full_d), 16, 1
    elif bwd:  # fastest of the sweep on an H100 (benchmarks/results/h100/fold_bench.json): 20.3 us
        bd, bc, nw = min(full_d, 32), 64, 2
    else:
        bd, bc, nw = full_d, min(128, max(16, 2048 // full_d)), 4
    if bwd and not _interpreting() and os.environ.get("RA_FOLD_BWD_TILES"):
        # tuning knob: "BLOCK_D,BLOCK_C,num_warps" (scripts/gpu_suite.sh sets it from the sweep on the card)
        bd, bc, nw = (int(v) for v in os.environ["RA_FOLD_BWD_TILES"].split(","))
    bd = block_d or bd
    bc = block_c or bc
    if not bwd and bd != full_d:
        raise ValueError(f"the forward fold needs BLOCK_D >= D (got block_d={bd}, D={D})")
    return {"BLOCK_D": bd, "BLOCK_R": block_r, "BLOCK_C": bc, "num_warps": num_warps or nw,
            "n_cb": -(-C // bc), "n_db": -(-D // bd)}


_REDUCE_MAX_S = 256  # slots summed per loop iteration of the reduction (a test lowers these to run the loops)
_REDUCE_MAX_J = 64


def _dummy(t: Tensor) -> Tensor:
    return t  # any tensor: the kernel never dereferences a pointer whose constexpr flag is off


# ---------------------------------------------------------------------------------------------------------------
# Implementations (the bodies of the custom ops; also called directly by the fallback autograd.Function)
# ---------------------------------------------------------------------------------------------------------------

def _fold_forward_impl(weight: Tensor, bias: Optional[Tensor], W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor,
                       kr: Tensor, routed: Optional[Tensor], n_head: int, variant: str, out_dtype: torch.dtype,
                       traceable: bool = True, block_c: Optional[int] = None,
                       num_warps: Optional[int] = None) -> tuple[Tensor, Tensor]:
    C = weight.shape[1]
    H = n_head
    D = C // H
    R = W.shape[1]
    ds, dp = std_width(variant, D, R), folded_width(variant, D, R)
    rows = 2 * H * dp + C
    out_w = torch.empty((rows, C), dtype=out_dtype, device=weight.device)
    out_b = torch.empty((rows if bias is not None else 0,), dtype=out_dtype, device=weight.device)
    cfg = _config(D, R, C, block_c, num_warps)
    kern = _kernels()["fwd"]
    grid = (H, cfg["n_cb"] + (1 if bias is not None else 0))
    _launcher(kern, traceable)[grid](
        weight, bias if bias is not None else _dummy(weight), W, qs, ks, qr, kr,
        routed if routed is not None else _dummy(qs), out_w, out_b if bias is not None else _dummy(out_w),
        C, H, D, R, ds, dp,
        HAS_BIAS=bias is not None, HAS_ROUTED=routed is not None, LOW_RANK=variant == "low_rank",
        FP64=weight.dtype == torch.float64, BLOCK_D=cfg["BLOCK_D"], BLOCK_R=cfg["BLOCK_R"],
        BLOCK_C=cfg["BLOCK_C"], BLOCK_CB=16, num_warps=cfg["num_warps"])
    return out_w, out_b


def _fold_backward_impl(grad_w: Tensor, grad_b: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                        W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor, kr: Tensor, routed: Optional[Tensor],
                        n_head: int, variant: str, traceable: bool = True, block_c: Optional[int] = None,
                        num_warps: Optional[int] = None,
                        block_d: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                   Tensor, Tensor]:
    C = weight.shape[1]
    H = n_head
    D = C // H
    R = W.shape[1]
    ds, dp = std_width(variant, D, R), folded_width(variant, D, R)
    fp64 = weight.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    has_bias = bias is not None
    cfg = _config(D, R, C, block_c, num_warps, bwd=True, block_d=block_d)
    n_per_head = cfg["n_cb"] + (1 if has_bias else 0)
    n_slots = H * n_per_head
    n_db = cfg["n_db"]
    dev = weight.device
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    d_bias = torch.empty((3 * C if has_bias else 0,), dtype=bias.dtype if has_bias else weight.dtype, device=dev)
    pw = torch.empty((n_slots, D, R), dtype=acc, device=dev)
    ps = torch.empty((n_slots * n_db, 4), dtype=acc, device=dev)
    ks_ = _kernels()
    _launcher(ks_["bwd"], traceable)[(H, n_per_head, n_db)](
        grad_w, grad_b if (has_bias and grad_b is not None) else _dummy(grad_w), weight,
        bias if has_bias else _dummy(weight), W, qs, ks, qr, kr,
        routed if routed is not None else _dummy(qs), d_weight, d_bias if has_bias else _dummy(d_weight), pw, ps,
        C, H, D, R, ds, dp,
        HAS_BIAS=has_bias, HAS_ROUTED=routed is not None, FP64=fp64, BLOCK_D=cfg["BLOCK_D"],
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_CB=16, num_warps=cfg["num_warps"])
    dW = torch.empty_like(W, memory_format=torch.contiguous_format)
    dqs, dks, dqr, dkr = (torch.empty_like(g, memory_format=torch.contiguous_format) for g in (qs, ks, qr, kr))
    # One program per 32 entries of dW (each sums a [n_slots, 32] strip, one load round trip when n_slots <= 256)
    # and one for the gates.
    block_e = 32
    n_e = -(-(D * R) // block_e)
    _launcher(ks_["reduce"], traceable)[(n_e + 1,)](
        pw, ps, dW, dqs, dks, dqr, dkr, n_slots, n_per_head * n_db, H, D * R,
        BLOCK_E=block_e, BLOCK_S=min(_REDUCE_MAX_S, max(16, _next_pow2(n_slots))),
        BLOCK_H=max(16, _next_pow2(H)), BLOCK_J=min(_REDUCE_MAX_J, max(16, _next_pow2(n_per_head * n_db))),
        num_warps=1 if _interpreting() else 4)
    return d_weight, d_bias, dW, dqs, dks, dqr, dkr


# ---------------------------------------------------------------------------------------------------------------
# Custom ops + autograd
# ---------------------------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, out_dtype = inputs
    ctx.save_for_backward(weight, bias, W, qs, ks, qr, kr, routed)
    ctx.n_head = n_head
    ctx.variant = variant


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
                          W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor, kr: Tensor, routed: Optional[Tensor],
                          n_head: int, variant: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                               Tensor]:
        return _fold_backward_impl(grad_w, grad_b, weight, bias, W, qs, ks, qr, kr, routed, n_head, variant)

    @make_op(f"{_OP_NAMESPACE}::fold_qkv")
    def fold_qkv(weight: Tensor, bias: Optional[Tensor], W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor,
                 kr: Tensor, routed: Optional[Tensor], n_head: int, variant: str,
                 out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return _fold_forward_impl(weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, out_dtype)

    def backward(ctx, grad_w, grad_b):
        weight, bias, W, qs, ks, qr, kr, routed = ctx.saved_tensors
        grad_w, grad_b = _zero_grads(ctx, grad_w, grad_b, weight, bias, W)
        dw, db, dW, dqs, dks, dqr, dkr = fold_qkv_backward(grad_w, grad_b, weight, bias, W, qs, ks, qr, kr,
                                                           routed, ctx.n_head, ctx.variant)
        return dw, (db if bias is not None else None), dW, dqs, dks, dqr, dkr, None, None, None, None

    fold_qkv.register_autograd(backward, setup_context=_setup_context)
    _fold_op, _fold_bwd_op = fold_qkv, fold_qkv_backward


class _FoldFunction(torch.autograd.Function):
    """Fallback for torch without ``triton_op``: the same kernels behind a plain autograd.Function."""

    @staticmethod
    def forward(ctx, weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, out_dtype):
        out = _fold_forward_impl(weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, out_dtype,
                                 traceable=False)
        _setup_context(ctx, (weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, out_dtype), out)
        return out

    @staticmethod
    def backward(ctx, grad_w, grad_b):
        weight, bias, W, qs, ks, qr, kr, routed = ctx.saved_tensors
        grad_w, grad_b = _zero_grads(ctx, grad_w, grad_b, weight, bias, W)
        dw, db, dW, dqs, dks, dqr, dkr = _fold_backward_impl(grad_w, grad_b, weight, bias, W, qs, ks, qr, kr,
                                                             routed, ctx.n_head, ctx.variant, traceable=False)
        return dw, (db if bias is not None else None), dW, dqs, dks, dqr, dkr, None, None, None, None


_register_ops()


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

def _fail(msg: str):
    raise ValueError(f"fused_fold_qkv_weight: {msg}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_inputs(weight, bias, W, gates, routed, n_head, variant, out_dtype) -> None:
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
    dev = weight.device
    named = (("weight", weight), ("W", W), ("bias", bias), ("qs", gates[0]), ("ks", gates[1]), ("qr", gates[2]),
             ("kr", gates[3]))
    for name, t in named:
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            _fail(f"{name} must be a tensor; got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            _fail(f"{name} must be float32/bfloat16/float16/float64; got {t.dtype}")
        if t.device != dev:
            _fail(f"{name} is on {t.device} but weight is on {dev}")
        if name in ("weight", "W", "bias") and not t.is_contiguous():
            _fail(f"{name} must be contiguous")
        if name[0] in "qk" and not (t.dim() == 1 and t.shape[0] == n_head):
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


def fused_fold_qkv_weight(weight: Tensor, bias: Optional[Tensor], W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor,
                          kr: Tensor, routed: Optional[Tensor], n_head: int, variant: str,
                          out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Fused :func:`reciprocal_attention.fold.fold_qkv_weight`: ``[3C, C]`` (+ ``[3C]``) -> ``[2 H D' + C, C]``.

    One Triton kernel forward, two backward (deterministic). Differentiable in ``weight, bias, W, qs, ks, qr,
    kr`` (not ``routed``). ``out_dtype`` (default ``weight.dtype``) is the dtype of the folded weight and bias;
    arithmetic is fp32 (fp64 for fp64 weights). Gradients come back in each parameter's own dtype.
    Raises ``RuntimeError`` without Triton and ``ValueError`` on bad inputs.
    """
    if not triton_available():
        raise RuntimeError(f"fused_fold_qkv_weight needs Triton, which failed to import ({_TRITON_ERROR}); "
                           "use reciprocal_attention.fold.fold_qkv_weight instead")
    gates = (qs, ks, qr, kr)
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    _check_inputs(weight, bias, W, gates, routed, n_head, variant, out_dtype)
    qs, ks, qr, kr = (g.contiguous() for g in gates)
    if routed is not None:
        routed = routed.contiguous()
    if _fold_op is not None:
        w, b = _fold_op(weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, out_dtype)
    else:
        w, b = _FoldFunction.apply(weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, out_dtype)
    return w, (b if bias is not None else None)


__all__ = ["fused_fold_qkv_weight", "triton_available"]
