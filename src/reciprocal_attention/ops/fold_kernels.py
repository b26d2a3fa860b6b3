"""The fused fold's Triton kernels (RA-SPEC 3.2); the op around them is :mod:`reciprocal_attention.ops.fold`.

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
  bitwise-equal gradients) and writes ``dW`` and ``dw_std, dw_rec`` through the chain rule of the gate form.

The gate sides and the routing are formed inside the kernels from the raw gates ``w_std, w_rec`` (``SEED``,
``ROUTE`` constexprs), so no other kernel runs around the fold, forward or backward.

Precision: arithmetic in fp32 (fp64 for fp64 weights). ``tl.dot`` runs on tf32 tensor cores: one product when
every operand is bf16/fp16 (tf32 holds those exactly, so the result is the IEEE one), ``tf32x3`` (three
products, fp32-level accuracy) when an operand is fp32.

TRITON_INTERPRET is read when a kernel is decorated, so set it before importing this module (tests/conftest.py
does). Helpers are module globals: the interpreter resolves called jit functions there, not in closures. Without
Triton this module defines nothing.
"""

from .registry import tl, triton

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
    def _head_gates(w_std, w_rec, thr, h, SEED: tl.constexpr, ROUTE: tl.constexpr, FP64: tl.constexpr):
        """Sides ``(qs, ks, qr, kr)`` of head ``h`` and its routed flag ``rt`` (int32 0/1), as
        ``reference.gate_sides`` / ``routed_heads``: signed gates ``qs = w_std, ks = 1, qr = w_rec, kr = 1``;
        SEED: every side is ``sqrt(max(w, 1e-8))``. ROUTE: the head is routed when ``w_rec[h] <= thr``."""
        w0 = _acc(tl.load(w_std + h), FP64)
        w2 = _acc(tl.load(w_rec + h), FP64)
        if SEED:
            qs = tl.sqrt(tl.maximum(w0, 1e-8))
            ks = qs
            qr = tl.sqrt(tl.maximum(w2, 1e-8))
            kr = qr
        else:
            qs = w0
            ks = w0 * 0.0 + 1.0
            qr = w2
            kr = w2 * 0.0 + 1.0
        if ROUTE:
            rt = (tl.load(w_rec + h).to(tl.float32) <= thr).to(tl.int32)
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
    def _fold_fwd_kernel(w_ptr, b_ptr, W_ptr, w_std, w_rec, thr, ow_ptr, ob_ptr,
                         C, H, D, R, DS, DP,
                         HAS_BIAS: tl.constexpr, SEED: tl.constexpr, ROUTE: tl.constexpr,
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
            qs, ks, qr, kr, rt = _head_gates(w_std, w_rec, thr, h, SEED, ROUTE, FP64)
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
    def _fold_bwd_kernel(gw_ptr, gb_ptr, w_ptr, b_ptr, W_ptr, w_std, w_rec, thr,
                         dw_ptr, db_ptr, pw_ptr, ps_ptr,
                         C, H, D, R, DS, DP, J0,
                         HAS_BIAS: tl.constexpr, SEED: tl.constexpr, ROUTE: tl.constexpr, FP64: tl.constexpr,
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
            qs, ks, qr, kr, rt = _head_gates(w_std, w_rec, thr, h, SEED, ROUTE, FP64)
            if j < n_cb:
                _bwd_tile(gw_ptr, w_ptr, dw_ptr, W_ptr, pw_ptr, ps_ptr, slot, ps_slot, d0, C, C, j * BLOCK_C, h,
                          rt, qs, ks, qr, kr, C, H, D, R, DS, DP, 1, FP64, IEEE, BLOCK_D, BLOCK_R, BLOCK_C)
            else:
                if HAS_BIAS:
                    _bwd_tile(gb_ptr, b_ptr, db_ptr, W_ptr, pw_ptr, ps_ptr, slot, ps_slot, d0, 1, 1, 0, h, rt,
                              qs, ks, qr, kr, C, H, D, R, DS, DP, 0, FP64, IEEE, BLOCK_D, BLOCK_R, BLOCK_CB)

    @triton.jit(do_not_specialize=["n_slots", "n_per_head", "H", "DR"])
    def _fold_bwd_reduce_kernel(pw_ptr, ps_ptr, dW_ptr, w_std, w_rec, d_std, d_rec,
                                n_slots, n_per_head, H, DR,
                                SEED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
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
            if SEED:  # both sides s = sqrt(max(w, 1e-8)): dw = (dqs + dks) / (2 s) where w >= 1e-8, else 0
                w0 = tl.load(w_std + hh, mask=hm, other=1.0).to(a0.dtype)
                w2 = tl.load(w_rec + hh, mask=hm, other=1.0).to(a0.dtype)
                side0 = tl.sqrt(tl.maximum(w0, 1e-8))  # (names distinct from the loop variables above: Triton
                side2 = tl.sqrt(tl.maximum(w2, 1e-8))  # types a name once across both branches)
                dw0 = tl.where(w0 >= 1e-8, (a0 + a1) * 0.5 / side0, 0.0)
                dw2 = tl.where(w2 >= 1e-8, (a2 + a3) * 0.5 / side2, 0.0)
                tl.store(d_std + hh, dw0.to(d_std.dtype.element_ty), mask=hm)
                tl.store(d_rec + hh, dw2.to(d_rec.dtype.element_ty), mask=hm)
            else:  # signed: qs = w_std, qr = w_rec (the K sides are constants)
                tl.store(d_std + hh, a0.to(d_std.dtype.element_ty), mask=hm)
                tl.store(d_rec + hh, a2.to(d_rec.dtype.element_ty), mask=hm)
