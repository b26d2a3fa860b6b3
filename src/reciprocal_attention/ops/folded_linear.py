"""The ``c_attn`` projection through the fused fold as one autograd node: ``y = x W~^T + b~`` (GitHub issue 3).

``W~, b~`` is the folded ``c_attn`` weight and bias of :mod:`reciprocal_attention.ops.fold`, and
``F.linear(x, *fused_fold_gated(...))`` is the same function with two autograd nodes: the GEMM's backward, then the
fold's. One node doing both can order the backward for overlap: the fold's backward (two kernels mapping ``dW~``
back to ``c_attn``, ``W_recip`` and the gates) needs ``dW~ = dy^T x`` and ``db~ = sum(dy)``, not ``dx = dy W~``,
and all but one column block of it needs only ``dW~``, so::

    main:  dW~ = dy^T x  -- fork --  db~ = sum(dy)      -- fork --  dx = dy W~                     -- join
    side:                            fold bwd, weight columns       fold bwd, bias column, reduction /

In a CUDA graph the branches are graph nodes without a dependency between them, so the fold's backward runs beside
the bias-gradient reduction (a memory-bound kernel at ~40% of the H100's bandwidth) and the input-gradient GEMM
instead of after them (``ops.settings.fold_overlap``: ``"capture"``, the default, forks only while a CUDA graph
is captured; ``"always"``; ``"never"``). Eager calls are bound by host time, where the stream switches would
cost more than they hide, so by default they run both on the current stream.

The fold's forward is not part of the node: :func:`fused_folded_linear` takes the fold made earlier (the module's
cache) or makes one and returns it, detached, for the caller to cache. The node is a
:class:`~reciprocal_attention.ops.registry.TritonOp` without custom ops (eager calls only: under torch.compile
the module keeps ``F.linear`` on the fold's op, which the compiler sees through); a backward that records a graph
(``create_graph=True``) differentiates the PyTorch fold instead of launching the kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import fold as _kfold
from .config import settings
from .registry import TritonOp

_SIDE: dict[tuple[int, int], "torch.cuda.Stream"] = {}


def _side_stream(t: Tensor) -> Optional["torch.cuda.Stream"]:
    """The side stream for the fold's backward on ``t``'s device, or None to stay on the current stream."""
    overlap = settings.fold_overlap
    if not t.is_cuda or overlap == "never" or (overlap == "capture" and not torch.cuda.is_current_stream_capturing()):
        return None
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    key = (idx, settings.fold_overlap_priority)
    s = _SIDE.get(key)
    if s is None:
        s = _SIDE[key] = torch.cuda.Stream(device=idx, priority=key[1])
    return s


def _forward(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], W: Tensor, w_std: Tensor, w_rec: Tensor,
             wf: Tensor, bf: Optional[Tensor], cfg: tuple) -> tuple[Tensor]:
    """``(y,)``: ``y = x2d @ wf^T + bf`` with ``(wf, bf)`` the fold of ``(weight, bias, W, w_std, w_rec)`` under
    ``cfg`` ``(n_head, variant, gate_mode, threshold, bias_channel)`` (``wf, bf`` are inputs without gradient;
    ``x2d`` already has ``wf``'s dtype)."""
    return (torch.addmm(bf, x2d, wf.t()) if bf is not None else torch.mm(x2d, wf.t()),)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x2d, weight, bias, W, w_std, w_rec, wf, bf, cfg = inputs
    ctx.save_for_backward(x2d, wf, weight, bias, W, w_std, w_rec)
    ctx.cfg = cfg


def _grads(ctx, _backward, gy: Tensor, *_) -> tuple:
    """Gradients to ``x2d`` and the parameters; the fold's backward forks onto the side stream (module docstring)."""
    xc, wf, weight, bias, W, w_std, w_rec = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not any(need[1:6]):
        return gy.mm(wf), None, None, None, None, None, None, None, None
    gwf = gy.t().mm(xc)
    side = _side_stream(gy)
    if side is None:
        gbf = gy.sum(0) if bias is not None else None
        grads = _kfold._fold_backward_impl(gwf, gbf, weight, bias, W, w_std, w_rec, *ctx.cfg)
        dx = gy.mm(wf) if need[0] else None
    else:
        main = torch.cuda.current_stream(gy.device)
        side.wait_stream(main)  # fork: the weight's column blocks of the fold backward need only dW~
        dx = None

        def between() -> Optional[Tensor]:  # on the main stream, while the side stream maps dW~ back
            nonlocal dx
            gbf = gy.sum(0) if bias is not None else None
            side.wait_stream(main)  # the bias column and the reduction need db~
            dx = gy.mm(wf) if need[0] else None
            return gbf

        # The fold backward frees its temporaries (allocated on the main stream) when it returns: nothing may
        # be allocated on the main stream between that and the join (it could reuse them while the side stream
        # still writes them), so everything the main stream computes is enqueued in between().
        grads = _kfold._fold_backward_impl(gwf, None, weight, bias, W, w_std, w_rec, *ctx.cfg, stream=side,
                                           between=between)
        main.wait_stream(side)  # join: the gradients are used on the main stream
    d_weight, d_bias, dW, d_std, d_rec = grads
    return dx, d_weight, (d_bias if bias is not None else None), dW, d_std, d_rec, None, None, None


def _differentiable_grads(ctx, gy: Tensor, *_) -> tuple:
    """The gradients as a differentiable function of the inputs (double backward: Hessian-vector products, gradient
    penalties): the readable PyTorch fold (``fold.fold_qkv_weight``) and ``F.linear`` differentiated by autograd.
    Only used when the backward itself records a graph; the Triton kernels have no backward of their own."""
    x2d, wf, weight, bias, W, w_std, w_rec = ctx.saved_tensors
    out_dtype = wf.dtype
    from ..fold import fold_qkv_weight
    from ..fold import gate_sides, routed_heads

    n_head, variant, gate_mode, threshold, bias_channel = ctx.cfg
    gates = {v: k for k, v in _kfold.GATE_MODES.items()}[gate_mode]
    qs, ks = gate_sides(w_std, gates)
    qr, kr = gate_sides(w_rec, gates)
    wf, bf = fold_qkv_weight(weight, bias, W, qs, ks, qr, kr, routed_heads(w_rec, threshold), n_head, variant,
                             bias_channel)
    y = torch.nn.functional.linear(x2d.to(out_dtype), wf.to(out_dtype), bf.to(out_dtype) if bf is not None else None)
    ins = (x2d, weight, bias, W, w_std, w_rec)
    idx = [i for i, t in enumerate(ins) if ctx.needs_input_grad[i] and t is not None]
    grads = torch.autograd.grad(y, [ins[i] for i in idx], gy, create_graph=True, allow_unused=True)
    out = [None] * 9
    for i, g in zip(idx, grads):
        out[i] = g
    return tuple(out)


_FOLDED_LINEAR = TritonOp("folded_linear", _forward, None, _setup_context, _grads, traceable=False,
                          differentiable_grads=_differentiable_grads)


def folded_linear(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], W: Tensor, w_std: Tensor, w_rec: Tensor,
                  n_head: int, variant: str, gate_mode: int, threshold: Optional[float], bias_channel: bool,
                  out_dtype: torch.dtype, folded: Optional[tuple[Tensor, Optional[Tensor]]] = None
                  ) -> tuple[Tensor, tuple[Tensor, Optional[Tensor]]]:
    """:func:`fused_folded_linear` without its input checks (the module calls this with parameters it checked
    when it made ``folded``)."""
    if folded is None:
        folded = _kfold._fold_forward_impl(weight, bias, W, w_std, w_rec, n_head, variant, gate_mode, threshold,
                                           bias_channel, out_dtype)
        if bias is None:
            folded = (folded[0], None)
    cfg = (n_head, variant, gate_mode, threshold, bias_channel)
    # The cast autocast's F.linear would make, outside the node: its autograd op keeps nothing, so the node
    # saves only the cast input (not the caller's fp32 one too) and a double backward still reaches x2d.
    x2d = x2d.to(folded[0].dtype)
    return _FOLDED_LINEAR(x2d, weight, bias, W, w_std, w_rec, folded[0], folded[1], cfg)[0], folded


def fused_folded_linear(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], W: Tensor, w_std: Tensor,
                        w_rec: Tensor, n_head: int, variant: str, gates: str = "signed",
                        routing_threshold: Optional[float] = None, out_dtype: Optional[torch.dtype] = None,
                        bias_channel: bool = False,
                        folded: Optional[tuple[Tensor, Optional[Tensor]]] = None
                        ) -> tuple[Tensor, tuple[Tensor, Optional[Tensor]]]:
    """``F.linear(x2d, *fused_fold_gated(weight, bias, W, w_std, w_rec, ...))`` as one autograd node.

    ``x2d``: ``[N, C]`` (cast to ``out_dtype``, default ``weight.dtype``, as autocast would). Returns ``(y, (wf,
    bf))``: ``y [N, 2 H D' + C]`` and the fold it used, without autograd history, which may be passed back as
    ``folded`` while the parameters are unchanged (the caller owns that promise; the forward then launches only
    the GEMM). Gradients flow to ``x2d, weight, bias, W, w_std, w_rec``. Eager calls on CUDA (or the interpreter).
    """
    out_dtype, thr = _kfold._check_gated(weight, bias, W, w_std, w_rec, n_head, variant, gates, routing_threshold,
                                         out_dtype, bias_channel)
    C = weight.shape[1]
    if not (isinstance(x2d, Tensor) and x2d.dim() == 2 and x2d.shape[1] == C and x2d.is_floating_point()
            and x2d.device == weight.device):
        _kfold._fail(f"x2d must be a floating-point [N, C] = [N, {C}] tensor on {weight.device}; got "
                     f"{_kfold._shape(x2d)}" + (f" {x2d.dtype} on {x2d.device}" if isinstance(x2d, Tensor) else ""))
    if folded is not None:
        _kfold._check_reuse(folded, weight, bias, W, n_head, variant, out_dtype, "folded")
    return folded_linear(x2d, weight, bias, W, w_std.contiguous(), w_rec.contiguous(), n_head, variant,
                         _kfold.GATE_MODES[gates], thr, bias_channel, out_dtype, folded)


__all__ = ["fused_folded_linear", "folded_linear"]
