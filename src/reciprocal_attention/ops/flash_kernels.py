"""The Triton kernels of :mod:`reciprocal_attention.ops.flash` (its docstring describes the design): forward,
backward ``delta``, backward column and row kernels, and their autotuning configs. Defined only where Triton
imports; :mod:`.flash` launches them."""

from __future__ import annotations

from . import INTERPRET
from .registry import tl, triton

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
