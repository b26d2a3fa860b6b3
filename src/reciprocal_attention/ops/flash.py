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
from .registry import TritonOp, launcher, require_triton, tl, triton

__all__ = ["flash_ra_attention", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
if triton is not None:

    def _configs(pairs):
        """Autotune configs: ``pairs`` is ``[(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]``."""
        if INTERPRET:  # one small config: the interpreter runs every program serially on the CPU
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]

    # forward: a program owns BLOCK_M query rows, steps over BLOCK_N key columns
    _FWD_CONFIGS = [
        (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
        (64, 64, 4, 4), (64, 32, 4, 2), (128, 128, 8, 2),
    ]
    # column kernel: a program owns BLOCK_N key columns, steps over BLOCK_M query rows
    _BWD_COL_CONFIGS = [
        (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2),
        (32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2),
    ]
    # row kernel: a program owns BLOCK_M query rows, steps over BLOCK_N key columns
    _BWD_ROW_CONFIGS = [
        (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2),
        (64, 32, 8, 2), (32, 64, 4, 2),
    ]
    # with settings.flash_autotune off: one config per kernel, checked with ptxas -v for sm_90 (bf16, D = 64 and 128, every
    # flag set): no register spills
    _FWD_FIXED, _BWD_COL_FIXED, _BWD_ROW_FIXED = (64, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2)
    _AUTOTUNE_KEY = ["T", "D", "HAS_A", "RECIP", "HAS_BIAS"]  # dtypes are added by the autotuner itself

    @triton.jit
    def _dot(x, y, IEEE: tl.constexpr):
        # fp32 inputs: IEEE fp32 products (tf32 would cost ~1e-3 relative); fp16/bf16: tensor cores, fp32 acc
        if IEEE:
            r = tl.dot(x, y, input_precision="ieee")
        else:
            r = tl.dot(x, y)
        return r

    @triton.jit
    def _head_coeffs(A, BC, h, scale, HAS_A: tl.constexpr, RECIP: tl.constexpr):
        """Per head: ``scale`` as fp32 (inductor passes Python floats as fp64 scalars), the coefficients ``a_h``
        (1 without ``a``) and ``b_h`` (0 without the reciprocal term), and the exp2-domain logit factors
        ``ca = a_h * scale * log2(e)``, ``cb = b_h * scale * log2(e)``."""
        scale = tl.cast(scale, tl.float32)
        qk_scale = scale * 1.4426950408889634
        if HAS_A:
            a_h = tl.load(A + h).to(tl.float32)
        else:
            a_h = scale * 0.0 + 1.0
        if RECIP:
            b_h = tl.load(BC + h).to(tl.float32)
        else:
            b_h = scale * 0.0
        return scale, a_h, b_h, qk_scale * a_h, qk_scale * b_h

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q, k_i, k_ptr, q_ptr, v_ptr, c_ptr,
        skt, sqt, svt, sct, ca, cb, offs_m, lo, hi, T,
        D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
        RECIP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):
        offs_d = tl.arange(0, D)
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if MASK:  # the diagonal tiles may also cross T
                mn = offs_n < T
                k_j = tl.load(k_ptr + offs_n[:, None] * skt + offs_d[None, :], mask=mn[:, None], other=0.0)
                v_j = tl.load(v_ptr + offs_n[:, None] * svt + offs_d[None, :], mask=mn[:, None], other=0.0)
            else:  # tiles strictly below the diagonal: every column j < start_m < T
                k_j = tl.load(k_ptr + offs_n[:, None] * skt + offs_d[None, :])
                v_j = tl.load(v_ptr + offs_n[:, None] * svt + offs_d[None, :])
            qk = _dot(q, tl.trans(k_j), IEEE) * ca  # a * scale * log2(e) * q_i.k_j
            if RECIP:
                if MASK:
                    q_j = tl.load(q_ptr + offs_n[:, None] * sqt + offs_d[None, :], mask=mn[:, None], other=0.0)
                else:
                    q_j = tl.load(q_ptr + offs_n[:, None] * sqt + offs_d[None, :])
                qk += _dot(k_i, tl.trans(q_j), IEEE) * cb  # b * scale * log2(e) * q_j.k_i
            if HAS_BIAS:
                if MASK:
                    c = tl.load(c_ptr + offs_n * sct, mask=mn, other=0.0).to(tl.float32)
                else:
                    c = tl.load(c_ptr + offs_n * sct).to(tl.float32)
                qk += c[None, :] * 1.4426950408889634
            if MASK:
                qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
            # every row has a finite logit in the first tile it visits (column hi1 <= start_m <= i), so
            # m_new is finite and alpha never sees (-inf) - (-inf)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v_j.dtype), v_j, IEEE)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["T"])  # one binary for every T (no T == 1 / T % 16 variants)
    def _ra_fwd_kernel(
        Q, K, V, O, LSE, CB, A, BC,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, scb, sch, sct,
        H, T, scale,
        D: tl.constexpr, HAS_A: tl.constexpr, RECIP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the heaviest (last) query blocks launch first
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        mask_m = offs_m < T
        q_ptr = Q + b * sqb + h * sqh
        k_ptr = K + b * skb + h * skh
        v_ptr = V + b * svb + h * svh
        c_ptr = CB + b * scb + h * sch
        scale, a_h, b_h, ca, cb = _head_coeffs(A, BC, h, scale, HAS_A, RECIP)
        q = tl.load(q_ptr + offs_m[:, None] * sqt + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        if RECIP:
            k_i = tl.load(k_ptr + offs_m[:, None] * skt + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        else:
            k_i = q
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        hi1 = (start_m // BLOCK_N) * BLOCK_N  # key tiles [0, hi1) lie strictly below the diagonal
        hi2 = tl.minimum(start_m + BLOCK_M, T)  # diagonal tiles [hi1, hi2); nothing above is visited
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_i, k_ptr, q_ptr, v_ptr, c_ptr, skt, sqt, svt, sct,
                                   ca, cb, offs_m, 0, hi1, T, D, BLOCK_N, False, RECIP, HAS_BIAS, IEEE)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_i, k_ptr, q_ptr, v_ptr, c_ptr, skt, sqt, svt, sct,
                                   ca, cb, offs_m, hi1, hi2, T, D, BLOCK_N, True, RECIP, HAS_BIAS, IEEE)
        acc = acc / l_i[:, None]
        lse = m_i + tl.math.log2(l_i)  # log2 units: the backward recomputes P = exp2(l * log2(e) - lse)
        tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=mask_m)
        o_ptr = O + b * sob + h * soh
        tl.store(o_ptr + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty), mask=mask_m[:, None])

    @triton.jit(do_not_specialize=["T"])  # one binary for every T (no T == 1 / T % 16 variants)
    def _bwd_delta_kernel(
        O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, T,
        D: tl.constexpr, BLOCK: tl.constexpr,
    ):
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        mask = offs_m < T
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask[:, None], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=mask[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=mask)

    @triton.jit
    def _bwd_col_inner(
        dk, dv, dq_r, dc, k, v, q_n, c,
        q_ptr, k_ptr, do_ptr, lse_ptr, delta_ptr, sqt, skt, sdt,
        ca, cb, offs_n, lo, hi, T,
        D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
        RECIP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):
        # transposed orientation: tiles are [BLOCK_N (key j), BLOCK_M (query i)]
        offs_d = tl.arange(0, D)
        for start_m in range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mm = offs_m < T  # the last query block may cross T, in either stage
            q_i = tl.load(q_ptr + offs_m[:, None] * sqt + offs_d[None, :], mask=mm[:, None], other=0.0)
            do = tl.load(do_ptr + offs_m[:, None] * sdt + offs_d[None, :], mask=mm[:, None], other=0.0)
            # rows past T get lse = +inf, hence P = 0 and dS = 0 there
            lse = tl.load(lse_ptr + offs_m, mask=mm, other=float("inf"))
            delta = tl.load(delta_ptr + offs_m, mask=mm, other=0.0)
            qk_t = _dot(k, tl.trans(q_i), IEEE) * ca  # [j, i]: k_j.q_i = S_ij
            if RECIP:
                k_i = tl.load(k_ptr + offs_m[:, None] * skt + offs_d[None, :], mask=mm[:, None], other=0.0)
                qk_t += _dot(q_n, tl.trans(k_i), IEEE) * cb  # [j, i]: q_j.k_i = S'_ij
            if HAS_BIAS:
                qk_t += c[:, None]
            p_t = tl.math.exp2(qk_t - lse[None, :])
            if MASK:
                p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, IEEE)
            dp_t = _dot(v, tl.trans(do), IEEE)
            ds_t = p_t * (dp_t - delta[None, :])  # gradient of the logits l_ij, fp32
            dk += _dot(ds_t.to(q_i.dtype), q_i, IEEE)
            if RECIP:
                dq_r += _dot(ds_t.to(k_i.dtype), k_i, IEEE)
            if HAS_BIAS:
                dc += tl.sum(ds_t, 1)  # column sums: dc_j = sum_i dS_ij
        return dk, dv, dq_r, dc

    @triton.jit(do_not_specialize=["T"])  # one binary for every T (no T == 1 / T % 16 variants)
    def _ra_bwd_col_kernel(
        Q, K, V, DO, LSE, DELTA, CB, A, BC,
        DK, DV, DQR, DC,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, scb, sch, sct,
        sdqb, sdqh, sdqt, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
        H, T, scale,
        D: tl.constexpr, HAS_A: tl.constexpr, RECIP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)  # key block 0 has the most work and launches first
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        row = bh.to(tl.int64) * T  # [B*H, T] buffers (LSE, DELTA, DC)
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        mask_n = offs_n < T
        q_ptr = Q + b * sqb + h * sqh
        k_ptr = K + b * skb + h * skh
        v_ptr = V + b * svb + h * svh
        do_ptr = DO + b * sdb + h * sdh
        scale, a_h, b_h, ca, cb = _head_coeffs(A, BC, h, scale, HAS_A, RECIP)
        k = tl.load(k_ptr + offs_n[:, None] * skt + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * svt + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        if RECIP:
            q_n = tl.load(q_ptr + offs_n[:, None] * sqt + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        else:
            q_n = k
        if HAS_BIAS:
            c = tl.load(CB + b * scb + h * sch + offs_n * sct, mask=mask_n, other=0.0).to(tl.float32)
            c = c * 1.4426950408889634
        else:
            c = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        dq_r = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        dc = tl.zeros([BLOCK_N], dtype=tl.float32)
        lo = (start_n // BLOCK_M) * BLOCK_M  # first query block holding a row i >= start_n
        # query blocks [lo, mid) touch the diagonal (masked); from mid on every i >= start_n + BLOCK_N > j
        mid = tl.minimum(lo + tl.cdiv(start_n + BLOCK_N - lo, BLOCK_M) * BLOCK_M, T)
        dk, dv, dq_r, dc = _bwd_col_inner(
            dk, dv, dq_r, dc, k, v, q_n, c, q_ptr, k_ptr, do_ptr, LSE + row, DELTA + row,
            sqt, skt, sdt, ca, cb, offs_n, lo, mid, T, D, BLOCK_M, True, RECIP, HAS_BIAS, IEEE)
        dk, dv, dq_r, dc = _bwd_col_inner(
            dk, dv, dq_r, dc, k, v, q_n, c, q_ptr, k_ptr, do_ptr, LSE + row, DELTA + row,
            sqt, skt, sdt, ca, cb, offs_n, mid, T, T, D, BLOCK_M, False, RECIP, HAS_BIAS, IEEE)
        # DV, DK (and DQR) have the layouts of v, k (and q): strides sdv*, sdk* (sdq*), unit stride on d
        dv_off = b * sdvb + h * sdvh + offs_n[:, None] * sdvt + offs_d[None, :]
        dk_off = b * sdkb + h * sdkh + offs_n[:, None] * sdkt + offs_d[None, :]
        tl.store(DV + dv_off, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])
        # without RECIP, DK is the final dk; with RECIP, an fp32 partial (in k's layout) the row kernel completes
        tl.store(DK + dk_off, (dk * (a_h * scale)).to(DK.dtype.element_ty), mask=mask_n[:, None])
        if RECIP:
            dq_off = b * sdqb + h * sdqh + offs_n[:, None] * sdqt + offs_d[None, :]
            tl.store(DQR + dq_off, dq_r * (b_h * scale), mask=mask_n[:, None])
        if HAS_BIAS:
            tl.store(DC + row + offs_n, dc, mask=mask_n)

    @triton.jit
    def _bwd_row_inner(
        dq, dk_r, da, db, q, k_i, do, lse, delta,
        q_ptr, k_ptr, v_ptr, c_ptr, sqt, skt, svt, sct,
        ca, cb, offs_m, lo, hi, T,
        D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_A: tl.constexpr,
        RECIP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):
        offs_d = tl.arange(0, D)
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if MASK:
                mn = offs_n < T
                k_j = tl.load(k_ptr + offs_n[:, None] * skt + offs_d[None, :], mask=mn[:, None], other=0.0)
                v_j = tl.load(v_ptr + offs_n[:, None] * svt + offs_d[None, :], mask=mn[:, None], other=0.0)
            else:
                k_j = tl.load(k_ptr + offs_n[:, None] * skt + offs_d[None, :])
                v_j = tl.load(v_ptr + offs_n[:, None] * svt + offs_d[None, :])
            s = _dot(q, tl.trans(k_j), IEEE)  # q_i.k_j = S_ij
            qk = s * ca
            if RECIP:
                if MASK:
                    q_j = tl.load(q_ptr + offs_n[:, None] * sqt + offs_d[None, :], mask=mn[:, None], other=0.0)
                else:
                    q_j = tl.load(q_ptr + offs_n[:, None] * sqt + offs_d[None, :])
                s2 = _dot(k_i, tl.trans(q_j), IEEE)  # k_i.q_j = S'_ij
                qk += s2 * cb
            if HAS_BIAS:
                if MASK:
                    c = tl.load(c_ptr + offs_n * sct, mask=mn, other=0.0).to(tl.float32)
                else:
                    c = tl.load(c_ptr + offs_n * sct).to(tl.float32)
                qk += c[None, :] * 1.4426950408889634
            p = tl.math.exp2(qk - lse[:, None])
            if MASK:
                p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v_j), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k_j.dtype), k_j, IEEE)
            if HAS_A:
                da += tl.sum(ds * s, 1)  # row sums of dS * S (masked entries have dS = 0)
            if RECIP:
                dk_r += _dot(ds.to(q_j.dtype), q_j, IEEE)
                db += tl.sum(ds * s2, 1)
        return dq, dk_r, da, db

    @triton.jit(do_not_specialize=["T"])  # one binary for every T (no T == 1 / T % 16 variants)
    def _ra_bwd_row_kernel(
        Q, K, V, DO, LSE, DELTA, CB, A, BC,
        DQ, DK, DQR, DKP, DA, DB,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, scb, sch, sct,
        sdqb, sdqh, sdqt, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
        H, T, scale,
        D: tl.constexpr, HAS_A: tl.constexpr, RECIP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        row = bh.to(tl.int64) * T
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        mask_m = offs_m < T
        q_ptr = Q + b * sqb + h * sqh
        k_ptr = K + b * skb + h * skh
        v_ptr = V + b * svb + h * svh
        c_ptr = CB + b * scb + h * sch
        scale, a_h, b_h, ca, cb = _head_coeffs(A, BC, h, scale, HAS_A, RECIP)
        q = tl.load(q_ptr + offs_m[:, None] * sqt + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :],
                     mask=mask_m[:, None], other=0.0)
        lse = tl.load(LSE + row + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(DELTA + row + offs_m, mask=mask_m, other=0.0)
        if RECIP:
            k_i = tl.load(k_ptr + offs_m[:, None] * skt + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        else:
            k_i = q
        dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        dk_r = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        da = tl.zeros([BLOCK_M], dtype=tl.float32)
        db = tl.zeros([BLOCK_M], dtype=tl.float32)
        hi1 = (start_m // BLOCK_N) * BLOCK_N
        hi2 = tl.minimum(start_m + BLOCK_M, T)
        dq, dk_r, da, db = _bwd_row_inner(dq, dk_r, da, db, q, k_i, do, lse, delta, q_ptr, k_ptr, v_ptr, c_ptr,
                                          sqt, skt, svt, sct, ca, cb, offs_m, 0, hi1, T,
                                          D, BLOCK_N, False, HAS_A, RECIP, HAS_BIAS, IEEE)
        dq, dk_r, da, db = _bwd_row_inner(dq, dk_r, da, db, q, k_i, do, lse, delta, q_ptr, k_ptr, v_ptr, c_ptr,
                                          sqt, skt, svt, sct, ca, cb, offs_m, hi1, hi2, T,
                                          D, BLOCK_N, True, HAS_A, RECIP, HAS_BIAS, IEEE)
        if HAS_A:  # per-row partials of da_h = scale * sum_ij dS_ij S_ij (and db_h with S')
            tl.store(DA + row + offs_m, da * scale, mask=mask_m)
        if RECIP:
            tl.store(DB + row + offs_m, db * scale, mask=mask_m)
        # DQ (and DQR) have q's layout, DK (and DKP) k's: strides sdq*, sdk*, unit stride on d
        dq_off = b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :]
        dq = dq * (a_h * scale)
        if RECIP:  # complete dq and dk with the column kernel's fp32 partials for these rows
            dk_off = b * sdkb + h * sdkh + offs_m[:, None] * sdkt + offs_d[None, :]
            dq += tl.load(DQR + dq_off, mask=mask_m[:, None], other=0.0)
            dk_r = dk_r * (b_h * scale) + tl.load(DKP + dk_off, mask=mask_m[:, None], other=0.0)
            tl.store(DK + dk_off, dk_r.to(DK.dtype.element_ty), mask=mask_m[:, None])
        tl.store(DQ + dq_off, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None])


    def _tuners(fn, pairs, fixed):
        """(autotuned over ``pairs``, single ``fixed`` config) wrappers of one jitted kernel."""
        return (triton.autotune(configs=_configs(pairs), key=_AUTOTUNE_KEY)(fn),
                triton.autotune(configs=_configs([fixed]), key=_AUTOTUNE_KEY)(fn))

    _FWD = _tuners(_ra_fwd_kernel, _FWD_CONFIGS, _FWD_FIXED)
    _BWD_COL = _tuners(_ra_bwd_col_kernel, _BWD_COL_CONFIGS, _BWD_COL_FIXED)
    _BWD_ROW = _tuners(_ra_bwd_row_kernel, _BWD_ROW_CONFIGS, _BWD_ROW_FIXED)


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
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

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
    launcher(_bwd_delta_kernel, q)[(triton.cdiv(T, delta_block), B * H)](
        o, do, delta, *_strides3(o), *_strides3(do), H, T, D=D, BLOCK=delta_block)

    def grid_n(meta):
        return (triton.cdiv(T, meta["BLOCK_N"]), B * H)

    def grid_m(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

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
