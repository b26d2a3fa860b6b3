"""Fused weight-space fold (RA-SPEC 3.2, GitHub issue 3): one kernel builds the folded ``c_attn`` weight from the
raw gate parameters, two map its gradient back.

:func:`fused_fold_gated` has the semantics and output layout of :func:`reciprocal_attention.fold.fold_qkv_weight`
(the readable oracle; read that first) fed ``reference.gate_sides`` and ``reference.routed_heads``. Per head ``h``::

    Wq~^h = [ qs_h Wq^h[:Ds] ; qr_h W^T Wk^h ]        Wk~^h = [ ks_h Wk^h[:Ds] ; kr_h W^T Wq^h ]

(bias likewise, as if it were column ``C`` of the weight); a routed head takes ``qs_h Wq^h`` / ``ks_h Wk^h`` over
the full ``D`` (and zero reciprocal rows for ``low_rank``); the V rows are copied. With ``bias_channel`` the
standard part is ``Ds = D - R - 1`` rows and each head's last row is reserved for the column bias (zero, and
``kappa = 1`` on the Q side of the folded bias; ``fold.add_bias_channel`` fills the K side after the GEMM). The
output is one contiguous ``[2 H D' + C, C]`` tensor in ``out_dtype``: under autocast pass ``torch.bfloat16`` and
the fold replaces the fp32 -> bf16 cast that ``F.linear`` would run on ``weight`` anyway. The kernels are in
:mod:`reciprocal_attention.ops.fold_kernels`; on an H100 at GPT-2 small: forward 3.9 us, backward 8.5 us with
bf16 parameters (``benchmarks/results/h100/profile``).

Registered through :class:`~reciprocal_attention.ops.registry.TritonOp` as ``reciprocal_attention::fold_qkv``
(and ``fold_qkv_backward``): traced by torch.compile, launched directly when eager, inside CUDA graphs too. Not
twice differentiable.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..fold import FOLDED_VARIANTS, folded_width, std_width
from . import INTERPRET, eager_launch
from .config import settings
from . import fold_kernels as _k
from .launch import next_pow2
from .registry import TritonOp, launcher, require_triton

__all__ = ["fused_fold_gated", "GATE_MODES"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

#: Gate forms the kernels compute from the raw gates ``w_std, w_rec`` (``reference.gate_sides``).
GATE_MODES = {"signed": 0, "seed": 1}

_REDUCE_MAX_S = 256  # slots summed per loop iteration of the reduction (a test lowers these to run the loops)
_REDUCE_MAX_J = 64


def _config(D: int, R: int, C: int, block_c: Optional[int] = None, num_warps: Optional[int] = None,
            bwd: bool = False, block_d: Optional[int] = None, wide: bool = True) -> dict:
    """Tile sizes. ``BLOCK_D``/``BLOCK_R`` are padded to powers of two >= 16 (``tl.dot``'s minimum).

    Forward: one program per (head, column block) for the Q/K rows, holding all D rows (it reduces over them for
    ``W^T Wk``), and one per (head, column block) copying the V rows. Backward: one program per (head, column
    block, d-block) for the Q/K rows, one per (head, column block, d-block) copying the V rows' gradient; the V
    copy has programs of its own and the Q/K code is ordered side by side because one program holding V and both
    Q/K sides spills (255 registers in 2-warp programs). ``settings.fold_bwd_tiles`` (a dot operand is fp32,
    ``wide``) and ``settings.fold_bwd_tiles_16`` (all 16-bit) override the backward tiles (the GPU suite sets them
    from the sweep in ``tests/test_gpu_fold.py``).
    """
    full_d = max(16, next_pow2(D))
    block_r = max(16, next_pow2(R))
    if INTERPRET:  # the interpreter runs each program in numpy: small tiles
        bd, bc, nw = (16 if bwd else full_d), 16, 1
    elif bwd:  # fastest of the sweep on an H100 (benchmarks/results/h100/fold_bench.json): 12.5 / 8.3 us
        bd, bc, nw = (min(full_d, 64), 64, 4) if wide else (16, 64, 2)
        override = settings.fold_bwd_tiles if wide else settings.fold_bwd_tiles_16
        if override is not None:
            bd, bc, nw = override
    else:  # 4.7 us at D = 64 (BLOCK_C = 32), the sweep's best
        bd, bc, nw = full_d, min(64, max(16, 2048 // full_d)), 4
    bd = block_d or bd
    bc = block_c or bc
    if not bwd and bd != full_d:
        raise ValueError(f"the forward fold needs BLOCK_D >= D (got block_d={bd}, D={D})")
    return {"BLOCK_D": bd, "BLOCK_R": block_r, "BLOCK_C": bc, "num_warps": num_warps or nw,
            "n_cb": -(-C // bc), "n_db": -(-D // bd)}


def _ieee(*tensors: Tensor) -> bool:
    """IEEE fp32 dots unless every dot operand is 16-bit: tf32 holds bf16/fp16 values exactly (and their products
    are exact in fp32), so tensor cores then give the IEEE result; fp32 operands would be rounded to tf32."""
    return any(t.dtype in (torch.float32, torch.float64) for t in tensors)


def _thr(threshold: Optional[float]) -> float:
    return float(threshold) if threshold is not None else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Launch functions. Absent pointers (no bias) get another tensor: the kernels never dereference a pointer whose
# constexpr flag is off.
# ---------------------------------------------------------------------------------------------------------------

def _fold_forward_impl(weight: Tensor, bias: Optional[Tensor], W: Tensor, w_std: Tensor, w_rec: Tensor,
                       n_head: int, variant: str, gate_mode: int, threshold: Optional[float], bias_channel: bool,
                       out_dtype: torch.dtype, block_c: Optional[int] = None,
                       num_warps: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """The folded weight and bias (an empty ``[0]`` tensor without bias); ``block_c``/``num_warps`` override the
    tiles (the GPU sweep)."""
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
    launcher(_k._fold_fwd_kernel, weight)[grid](
        weight, bias if bias is not None else weight, W, w_std, w_rec, _thr(threshold),
        out_w, out_b if bias is not None else out_w, C, H, D, R, ds, dp,
        HAS_BIAS=bias is not None, SEED=gate_mode == GATE_MODES["seed"], ROUTE=threshold is not None,
        LOW_RANK=variant == "low_rank", FP64=weight.dtype == torch.float64, IEEE=_ieee(weight, W),
        BLOCK_D=cfg["BLOCK_D"], BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_CB=16,
        num_warps=cfg["num_warps"])
    return out_w, out_b


def _fold_backward_impl(grad_w: Tensor, grad_b: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                        W: Tensor, w_std: Tensor, w_rec: Tensor, n_head: int, variant: str, gate_mode: int,
                        threshold: Optional[float], bias_channel: bool, block_c: Optional[int] = None,
                        num_warps: Optional[int] = None, block_d: Optional[int] = None, stream=None,
                        between: Optional[Callable[[], Optional[Tensor]]] = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(d_weight, d_bias, dW, dw_std, dw_rec)`` (``d_bias`` empty without bias).

    ``stream`` and/or ``between``: launch the kernels on ``stream`` (None: the current one) in two parts. The
    programs of the weight's columns go first and read only ``grad_w``; then ``between()`` runs on the current
    stream and returns ``grad_b`` (it computes it and makes ``stream`` wait for it); then the bias column's
    programs and the reduction. Everything is allocated on the current stream before the first launch; the caller
    makes the current stream wait for ``stream`` before it uses the results and before it allocates anything more
    on the current stream (the temporaries are freed on return while ``stream`` may still use them).
    ``ops.folded_linear`` overlaps the fold backward with the GEMM's own backward this way."""
    C = weight.shape[1]
    H = n_head
    D = C // H
    R = W.shape[1]
    ds, dp = std_width(variant, D, R, bias_channel), folded_width(variant, D, R)
    fp64 = weight.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    has_bias = bias is not None
    ieee = _ieee(grad_w, weight, W)
    seed = gate_mode == GATE_MODES["seed"]
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
    d_std = torch.empty_like(w_std, memory_format=torch.contiguous_format)
    d_rec = torch.empty_like(w_rec, memory_format=torch.contiguous_format)
    # One reduction program per 32 entries of dW (each sums a [n_slots, 32] strip, one load round trip when
    # n_slots <= 256) and one for the gates.
    block_e = 32
    n_e = -(-(D * R) // block_e)

    def tiles(j0: int, n_j: int, grad_b: Optional[Tensor]) -> None:
        launcher(_k._fold_bwd_kernel, grad_w)[(H, n_j, 2 * n_db)](
            grad_w, grad_b if (has_bias and grad_b is not None) else grad_w, weight, bias if has_bias else weight,
            W, w_std, w_rec, _thr(threshold), d_weight, d_bias if has_bias else d_weight, pw, ps,
            C, H, D, R, ds, dp, j0,
            HAS_BIAS=has_bias, SEED=seed, ROUTE=threshold is not None, FP64=fp64, IEEE=ieee,
            BLOCK_D=cfg["BLOCK_D"], BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_CB=16,
            num_warps=cfg["num_warps"])

    def reduce() -> None:
        launcher(_k._fold_bwd_reduce_kernel, pw)[(n_e + 1,)](
            pw, ps, dW, w_std, w_rec, d_std, d_rec, n_slots, n_per_head * n_db, H, D * R, SEED=seed,
            BLOCK_E=block_e, BLOCK_S=min(_REDUCE_MAX_S, max(16, next_pow2(n_slots))),
            BLOCK_H=max(16, next_pow2(H)), BLOCK_J=min(_REDUCE_MAX_J, max(16, next_pow2(n_per_head * n_db))),
            num_warps=1 if INTERPRET else 4)

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
    return d_weight, d_bias, dW, d_std, d_rec


# ---------------------------------------------------------------------------------------------------------------
# The op: forward and backward launch functions (the custom ops' schemas come from these annotations)
# ---------------------------------------------------------------------------------------------------------------

def _fold_forward(weight: Tensor, bias: Optional[Tensor], W: Tensor, w_std: Tensor, w_rec: Tensor, n_head: int,
                  variant: str, gate_mode: int, threshold: Optional[float], bias_channel: bool,
                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _fold_forward_impl(weight, bias, W, w_std, w_rec, n_head, variant, gate_mode, threshold, bias_channel,
                              out_dtype)


def _fold_backward(grad_w: Tensor, grad_b: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], W: Tensor,
                   w_std: Tensor, w_rec: Tensor, n_head: int, variant: str, gate_mode: int,
                   threshold: Optional[float], bias_channel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fold_backward_impl(grad_w, grad_b, weight, bias, W, w_std, w_rec, n_head, variant, gate_mode,
                               threshold, bias_channel)


def _setup_context(ctx, inputs: tuple, output) -> None:
    weight, bias, W, w_std, w_rec, n_head, variant, gate_mode, threshold, bias_channel, _ = inputs
    ctx.save_for_backward(weight, bias, W, w_std, w_rec)
    ctx.cfg = (n_head, variant, gate_mode, threshold, bias_channel)


def _grads(ctx, backward, grad_w: Optional[Tensor], grad_b: Optional[Tensor]) -> tuple:
    weight, bias, W, w_std, w_rec = ctx.saved_tensors
    n_head, variant = ctx.cfg[:2]
    rows = 2 * n_head * folded_width(variant, weight.shape[1] // n_head, W.shape[1]) + weight.shape[1]
    if grad_w is None:  # an output the loss did not use
        grad_w = weight.new_zeros((rows, weight.shape[1]))
    if bias is not None and (grad_b is None or grad_b.numel() == 0):
        grad_b = bias.new_zeros((rows,))
    dw, db, dW, d_std, d_rec = backward(grad_w.contiguous(), grad_b.contiguous() if bias is not None else None,
                                        weight, bias, W, w_std, w_rec, *ctx.cfg)
    return dw, (db if bias is not None else None), dW, d_std, d_rec, None, None, None, None, None, None


_FOLD = TritonOp("fold_qkv", _fold_forward, _fold_backward, _setup_context, _grads)


# ---------------------------------------------------------------------------------------------------------------
# Public API: inputs checked here, at the boundary
# ---------------------------------------------------------------------------------------------------------------

def _fail(msg: str):
    raise ValueError(f"fused_fold_gated: {msg}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_tensor(name: str, t, n_head: int, dev: torch.device) -> None:
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a tensor; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        _fail(f"{name} must be float32/bfloat16/float16/float64; got {t.dtype}")
    if t.device != dev:
        _fail(f"{name} is on {t.device} but weight is on {dev}")
    if name in ("weight", "W", "bias") and not t.is_contiguous():
        _fail(f"{name} must be contiguous")
    if name in ("w_std", "w_rec") and not (t.dim() == 1 and t.shape[0] == n_head):
        _fail(f"{name} must have shape [n_head] = [{n_head}]; got {_shape(t)}")


def _check_gated(weight, bias, W, w_std, w_rec, n_head, variant, gates, routing_threshold, out_dtype,
                 bias_channel) -> tuple[torch.dtype, Optional[float]]:
    """The checks of :func:`fused_fold_gated` and ``folded_linear.fused_folded_linear`` (messages are formatted
    only on failure); returns ``(out_dtype, threshold)`` resolved."""
    require_triton("the fused fold", "use reciprocal_attention.fold.fold_qkv_weight instead")
    if gates not in GATE_MODES:
        _fail(f"gates must be 'signed' or 'seed'; got {gates!r}")
    if routing_threshold is not None and not isinstance(routing_threshold, (int, float)):
        _fail(f"routing_threshold must be a float or None; got {type(routing_threshold).__name__}")
    if bias_channel and routing_threshold is not None:
        _fail("bias_channel does not combine with routing (a routed head would use every feature)")
    out_dtype = weight.dtype if out_dtype is None else out_dtype
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
    if bias_channel and (variant != "same_flop" or R > D - 2):
        _fail(f"bias_channel needs variant 'same_flop' and R <= D-2 = {D - 2}; got variant={variant!r}, R={R}")
    for name, t in (("weight", weight), ("W", W), ("bias", bias), ("w_std", w_std), ("w_rec", w_rec)):
        if t is not None or name != "bias":
            _check_tensor(name, t, n_head, weight.device)
    if bias is not None and not (bias.dim() == 1 and bias.shape[0] == 3 * C):
        _fail(f"bias must have shape [3C] = [{3 * C}]; got {_shape(bias)}")
    if out_dtype not in _FLOAT_DTYPES:
        _fail(f"out_dtype must be float32/bfloat16/float16/float64; got {out_dtype}")
    if weight.device.type != "cuda" and not INTERPRET:
        _fail(f"the fused fold runs on CUDA tensors (or any device with TRITON_INTERPRET=1); got {weight.device}")
    return out_dtype, (float(routing_threshold) if routing_threshold is not None else None)


def _check_reuse(reuse, weight, bias, W, n_head, variant, out_dtype, arg: str) -> None:
    """``reuse`` (called ``arg`` by the caller) must be a fold these parameters could have made, on an eager call."""
    if _FOLD.fwd_op is not None and not eager_launch(weight):
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


def fused_fold_gated(weight: Tensor, bias: Optional[Tensor], W: Tensor, w_std: Tensor, w_rec: Tensor,
                     n_head: int, variant: str, gates: str = "signed", routing_threshold: Optional[float] = None,
                     out_dtype: Optional[torch.dtype] = None, bias_channel: bool = False,
                     reuse: Optional[tuple[Tensor, Optional[Tensor]]] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Fused ``fold.fold_qkv_weight(weight, bias, W, *gate_sides(w_std, gates), *gate_sides(w_rec, gates),
    routed_heads(w_rec, routing_threshold), n_head, variant, bias_channel=...)``: ``[3C, C]`` (+ ``[3C]``) ->
    ``[2 H D' + C, C]`` (+ ``[2 H D' + C]``), with the gate sides and the routing formed inside the kernels
    (``gates`` = ``"signed"`` or ``"seed"``), so no other kernel runs forward or backward.

    One Triton kernel forward, two backward (deterministic). Gradients flow to ``weight, bias, W, w_std, w_rec``
    in each parameter's own dtype. ``out_dtype`` (default ``weight.dtype``) is the dtype of the folded weight and
    bias; arithmetic is fp32 (fp64 for fp64 weights). ``bias_channel``: reserve each head's last Q/K feature (zero
    rows) for the column bias, as the oracle does.

    ``reuse``: ``(folded_weight, folded_bias)`` made earlier by this function from these exact parameter values
    (the caller owns that promise, e.g. a cache keyed on version counters). The forward then returns views of them
    and launches nothing; the backward still maps the gradient back. Eager calls only.
    Raises ``RuntimeError`` without Triton and ``ValueError`` on bad inputs.
    """
    out_dtype, thr = _check_gated(weight, bias, W, w_std, w_rec, n_head, variant, gates, routing_threshold,
                                  out_dtype, bias_channel)
    if reuse is not None:
        _check_reuse(reuse, weight, bias, W, n_head, variant, out_dtype, "reuse")
        reuse = (reuse[0], reuse[1] if reuse[1] is not None else reuse[0].new_empty((0,)))
    w, b = _FOLD(weight, bias, W, w_std.contiguous(), w_rec.contiguous(), n_head, variant, GATE_MODES[gates], thr,
                 bias_channel, out_dtype, precomputed=reuse)
    return w, (b if bias is not None else None)
