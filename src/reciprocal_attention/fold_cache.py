"""The folded ``c_attn`` weight of a :class:`~reciprocal_attention.attention.ReciprocalAttention` and its cache.

The weight-space fold (RA-SPEC 3.2) turns ``c_attn``'s weight into one that emits ``[Q~ | K~ | V]`` directly. It
changes only when a parameter does, so it is cached: keyed on every parameter's version counter, storage and dtype
and on a global count of optimizer steps (fused optimizers such as ``AdamW(fused=True)`` update parameters without
bumping version counters; without the count, eval losses in a training run were computed on stale weights), and
dropped by ``train()``/``eval()``, ``load_state_dict`` and ``.to()``. A write through ``param.data`` bypasses all
of these: call ``invalidate_cache()`` after such writes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import fold as _fold
from .fold import gate_sides, routed_heads
from .ops import eager_launch

_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(*_args: Any, **_kwargs: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


TRACED_FOLDS = ("triton", "pytorch")


class FoldedProjection:
    """Mixin of :class:`ReciprocalAttention`: the folded ``c_attn`` weight, its cache, and the ``[Q~ | K~ | V]``
    GEMM (``_qkv``). Reads the module's ``_plan`` (``qkv`` = ``"fold"`` or ``"fused_fold"``).

    ``traced_fold`` (attribute): how the ``fused_fold`` plan folds while torch.compile traces. ``"triton"``
    (default): the fold's Triton kernels as a ``triton_op``; ``"pytorch"``: the PyTorch-op fold of the ``fold`` plan,
    which inductor compiles and launches with its own kernels. The compiled step of GPT-2 small is host-bound on an
    H100, and the Triton fold's launches are among the host time RA adds, so the choice is a benchmark arm
    (``ra bench --model gpt2 --model-presets ra+pytorch-fold``), not yet a measured default. An attribute of the
    module, not a global: dynamo guards on it, so each compiled model keeps the fold it was compiled with.
    """

    _traced_fold: str = "triton"

    @property
    def traced_fold(self) -> str:
        return self._traced_fold

    @traced_fold.setter
    def traced_fold(self, value: str) -> None:
        _fold.check_choice("traced_fold", value, TRACED_FOLDS)
        self.__dict__["_traced_fold"] = value

    def _fold_params(self) -> list[Tensor]:
        """``[c_attn.weight, W_recip, w_std, w_rec (, c_attn.bias)]``, read from the parameter dicts (an eager call
        pays ~1 us per ``nn.Module.__getattr__``); attribute lookup where a parametrization moved one."""
        P, A = self._parameters, self.c_attn._parameters
        try:
            ps = [A["weight"], P["W_recip"], P["w_std"], P["w_rec"]]
            bias = A.get("bias")
        except KeyError:
            ps = [self.c_attn.weight, self.W_recip, self.w_std, self.w_rec]
            bias = self.c_attn.bias
        return ps + ([bias] if bias is not None else [])

    def invalidate_cache(self) -> None:
        """Drop the cached folded weight (needed only after writes through ``param.data``)."""
        self._fold_cache = None

    def _routed(self) -> Tensor | None:
        return routed_heads(self.w_rec, self.routing_threshold)

    def _gate_sides(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        qs, ks = gate_sides(self.w_std, self.gates)
        qr, kr = gate_sides(self.w_rec, self.gates)
        return qs, ks, qr, kr

    def folded_weight(self, out_dtype: torch.dtype | None = None,
                      params: list[Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """The folded ``c_attn`` weight/bias emitting ``[Q~ | K~ | V]``, rebuilt only when a parameter changed.

        The fold is cached under a key of every parameter's version counter, storage and dtype plus the global
        optimizer-step count. Without autograd a hit returns the cached tensors (eval costs exactly the baseline).
        With autograd on the fused path, a hit skips the fold's forward kernel and keeps its backward (gradient
        accumulation over micro-batches, repeated calls between optimizer steps); that path neither reads nor
        writes the cache while a CUDA graph is captured (a training replay must rebuild the fold from the
        parameters). Nothing is cached while torch.compile traces. Writes through ``param.data`` (manual
        ``p.data.sub_(...)`` updates, some EMA code) bypass version counters in training too: call
        ``invalidate_cache()`` after them. ``params``: :meth:`_fold_params` when the caller already has them.
        """
        params = self._fold_params() if params is None else params
        weight, W, w_std, w_rec = params[:4]
        bias = params[4] if len(params) == 5 else None
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        fused = self._plan.qkv == "fused_fold" and not (self._traced_fold == "pytorch"
                                                       and torch.compiler.is_compiling())
        key = self._fold_key(params, out_dtype, needs_grad, fused)
        hit = self._cached_fold(key)
        if hit is not None and not needs_grad:
            return hit
        if fused:  # gate sides and routing formed inside the fold kernels
            from .ops.fold import fused_fold_gated

            wf, bf = fused_fold_gated(weight, bias, W, w_std, w_rec, self.n_head, self.variant, gates=self.gates,
                                      routing_threshold=self.routing_threshold, out_dtype=out_dtype,
                                      bias_channel=self.bias_channel, reuse=hit)
        else:
            wf, bf = _fold.fold_qkv_weight(weight, bias, W, *self._gate_sides(), self._routed(), self.n_head,
                                           self.variant, self.bias_channel)
            if out_dtype is not None:
                wf, bf = wf.to(out_dtype), (bf.to(out_dtype) if bf is not None else None)
        if key is not None and hit is None:
            self.__dict__["_fold_cache"] = (key, wf.detach(), bf.detach() if bf is not None else None)
        return wf, bf

    def _fold_key(self, params: list[Tensor], out_dtype: torch.dtype | None, needs_grad: bool,
                  fused: bool) -> tuple | None:
        """The cache key of the fold of ``params``, or None where no cache may be read or written: with
        ``cache_fold`` off, while torch.compile traces, and with autograd on unless the fused fold runs outside a
        CUDA graph capture (a replay must rebuild the fold; the PyTorch fold's backward needs its own graph)."""
        if not self.cache_fold or torch.compiler.is_compiling():
            return None
        if needs_grad and not (fused and not (params[0].is_cuda and torch.cuda.is_current_stream_capturing())):
            return None
        # id(p) as well: the cache holds no reference to the parameters, and a parameter replaced by a new one
        # can get the old one's storage address and version; a match then also needs the old object's id
        # no device: under unified addressing a pointer names one device's memory (a list: faster than a genexpr)
        return tuple([(id(p), p._version, p.data_ptr(), p.dtype) for p in params]) + (out_dtype, _OPTIMIZER_STEPS[0])

    def _cached_fold(self, key: tuple | None) -> tuple[Tensor, Tensor | None] | None:
        """The cached fold under ``key``; a stale entry is dropped first (peak memory: freed before the new fold is
        made). ``__dict__`` skips ``nn.Module.__setattr__``'s type checks (a few us per eager call)."""
        if key is None:
            return None
        cache = self._fold_cache
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        self.__dict__["_fold_cache"] = None
        return None

    def _qkv(self, x2d: Tensor, out_dtype: torch.dtype | None) -> Tensor:
        """``[Q~ | K~ | V]`` of every token of ``x2d [N, C]``: one GEMM on the folded weight. Eager training calls
        on CUDA go through one autograd node (GEMM + the fold's backward, ``ops.folded_linear``) with the
        fold from the cache when the parameters are unchanged; everything else through :meth:`folded_weight`."""
        params = self._fold_params()
        weight = params[0]
        if (self._plan.qkv == "fused_fold" and torch.is_grad_enabled() and any(p.requires_grad for p in params)
                and eager_launch(weight)):
            from .ops.fold import GATE_MODES
            from .ops.folded_linear import folded_linear, fused_folded_linear

            key = self._fold_key(params, out_dtype, True, True)
            hit = self._cached_fold(key)
            bias = params[4] if len(params) == 5 else None
            if hit is None:  # checks the parameters once per fold; a hit is the fold of checked parameters
                y, made = fused_folded_linear(x2d, weight, bias, *params[1:4], self.n_head, self.variant,
                                              gates=self.gates, routing_threshold=self.routing_threshold,
                                              out_dtype=out_dtype, bias_channel=self.bias_channel)
                if key is not None:
                    self.__dict__["_fold_cache"] = (key, made[0], made[1])
                return y
            thr = float(self.routing_threshold) if self.routing_threshold is not None else None
            return folded_linear(x2d, weight, bias, *params[1:4], self.n_head, self.variant, GATE_MODES[self.gates],
                                 thr, self.bias_channel, hit[0].dtype, hit)[0]
        wf, bf = self.folded_weight(out_dtype=out_dtype, params=params)
        return F.linear(x2d, wf, bf)
