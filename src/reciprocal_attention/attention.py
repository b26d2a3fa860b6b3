"""``ReciprocalAttention``: a drop-in GPT-2 causal self-attention with every RA variant, and a functional API.

Backends (``backend=``):

* ``reference``: the float64-exact oracle of :mod:`reciprocal_attention.reference` (materialises ``T x T``).
* ``sdpa``: PyTorch ``scaled_dot_product_attention`` on folded inputs. ``same_flop``/``low_rank`` use the
  weight-space fold (one GEMM emits ``[Q~ | K~ | V]``); a discoverability bias rides in one extra Q/K feature
  (channel fold); ``full`` concatenates ``[Q, K] . [K, Q]`` with V zero-padded. All exact.
* ``triton``: the fused kernels of :mod:`reciprocal_attention.ops` (learned column bias with its gradient;
  full-rank ``S + S^T`` without padding). CUDA only.
* ``auto``: ``triton`` where it is the fastest correct path on the device (CUDA with discoverability, or the
  ``full`` variant), else ``sdpa``. :meth:`ReciprocalAttention.explain_backend` says which and why.

The weight-space fold is rebuilt only when it must be: when no autograd graph is needed (eval, ``no_grad``) the
folded weight is cached and keyed on every parameter's version counter, storage and dtype and on a global count of
optimizer steps (fused optimizers don't bump version counters), and dropped by ``train()``/``eval()``,
``load_state_dict`` and ``.to()``. (A write through ``param.data`` bypasses all of these: call
:meth:`ReciprocalAttention.invalidate_cache` after such writes.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import fold as _fold
from .ops import INTERPRET, TRITON_AVAILABLE, eager_launch
from .reference import GATES, VARIANTS, check_choice, discoverability_bias, gate_sides, ra_attention, routed_heads

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "sdpa", "triton")
DISCOVERABILITY = (None, "positional", "content")
PRESETS = ("standard", "seed", "ra", "ra_disc", "ra_disc_channel", "full", "low_rank", "output_gate")


# --------------------------------------------------------------------------------------------------------------
# Fold-cache invalidation
# --------------------------------------------------------------------------------------------------------------
# A cached folded weight is keyed on every parameter's version counter, storage and dtype. Version counters are
# not enough: fused optimizers (torch.optim.AdamW(fused=True), the default on CUDA in this package's trainer)
# update parameters without bumping them. So every optimizer step anywhere also bumps a global generation that is
# part of the key. (Measured: with only version counters, eval losses in a training run used stale weights.)
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(*_args: Any, **_kwargs: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


# --------------------------------------------------------------------------------------------------------------
# Backend helpers
# --------------------------------------------------------------------------------------------------------------

def _triton_usable(device: torch.device) -> bool:
    return TRITON_AVAILABLE and (device.type == "cuda" or INTERPRET)


def _fused_fold_usable(weight: Tensor) -> bool:
    """The fused Triton fold runs on CUDA tensors of at least fp16 width when Triton is there."""
    return weight.device.type == "cuda" and TRITON_AVAILABLE and weight.dtype != torch.float64


def _fused_channel_usable(qkv: Tensor) -> bool:
    """The fused bias-channel kernels run on eager (and CUDA-graph) CUDA calls; torch.compile keeps the PyTorch
    ops, which inductor fuses."""
    if not (qkv.is_cuda and TRITON_AVAILABLE):
        return False
    from .ops.channel import fused_channel_usable

    return fused_channel_usable(qkv)


def fold_qkv(weight: Tensor, bias: Tensor | None, W: Tensor, qs: Tensor, ks: Tensor, qr: Tensor, kr: Tensor,
             routed: Tensor | None, n_head: int, variant: str, out_dtype: torch.dtype | None = None,
             impl: str = "auto", bias_channel: bool = False) -> tuple[Tensor, Tensor | None]:
    """Weight-space fold, fused on CUDA (one Triton kernel, gradient mapped back in fused kernels), else PyTorch.

    ``impl``: ``"auto"`` | ``"triton"`` | ``"torch"``. Returns the folded weight and bias in ``out_dtype``.
    """
    check_choice("impl", impl, ("auto", "triton", "torch"))
    if impl == "triton" or (impl == "auto" and _fused_fold_usable(weight)):
        from .ops.fold import fused_fold_qkv_weight

        return fused_fold_qkv_weight(weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, out_dtype=out_dtype,
                                     bias_channel=bias_channel)
    wf, bf = _fold.fold_qkv_weight(weight, bias, W, qs, ks, qr, kr, routed, n_head, variant, bias_channel)
    if out_dtype is not None:
        wf = wf.to(out_dtype)
        bf = bf.to(out_dtype) if bf is not None else None
    return wf, bf


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale: float, dropout_p: float, causal: bool = True,
          attn_mask: Tensor | None = None) -> Tensor:
    """SDPA that also accepts a V narrower than Q/K (zero-pads V, then slices: fused backends need equal widths)."""
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=causal and attn_mask is None, scale=scale)
    return out[..., :dv]


# --------------------------------------------------------------------------------------------------------------
# Functional API on [B, H, T, D] tensors
# --------------------------------------------------------------------------------------------------------------

def reciprocal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, variant: str = "same_flop", W: Tensor | None = None,
    w_std: Tensor | None = None, w_rec: Tensor | None = None, gates: str = "signed",
    routing_threshold: float | None = None, col_bias: Tensor | None = None, scale: float | None = None,
    dropout_p: float = 0.0, backend: str = "auto",
) -> Tensor:
    """Causal RA on ``q, k, v`` of shape ``[B, H, T, D]``; the logits of :func:`reference.ra_logits`.

    ``col_bias``: ``[H, T]`` or ``[B, H, T]``. ``backend`` as the module's. Returns ``[B, H, T, D]``.
    """
    check_choice("variant", variant, VARIANTS)
    check_choice("backend", backend, BACKENDS)
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must have shape [B, H, T, D]; got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if backend == "reference":
        probs_out = ra_attention(q, k, v, variant=variant, W=W, w_std=w_std, w_rec=w_rec, gates=gates,
                                 routing_threshold=routing_threshold, col_bias=col_bias, scale=scale)
        return probs_out
    if variant == "standard":
        qf, kf = q, k
    else:
        if w_std is None or w_rec is None:
            raise ValueError(f"variant {variant!r} needs w_std and w_rec of shape [H]={q.shape[1]}")
        qs, ks = gate_sides(w_std, gates)
        qr, kr = gate_sides(w_rec, gates)
        routed = routed_heads(w_rec, routing_threshold)
        if variant == "full":
            if routed is not None:  # a routed head keeps only a_h q_i.k_j
                qr = torch.where(routed, torch.zeros_like(qr), qr)
            use_triton = backend == "triton" or (backend == "auto" and q.device.type == "cuda" and
                                                 _triton_usable(q.device) and D in (16, 32, 64, 128))
            if use_triton:
                from .ops.flash import flash_ra_attention

                return flash_ra_attention(q, k, v, scale=scale, col_bias=col_bias, a=qs * ks, b=qr * kr)
            qf, kf = _fold.full_qk(q, k, qs, ks, qr, kr)
        else:
            if W is None:
                raise ValueError(f"variant {variant!r} needs W of shape [D, R] with D={D}")
            qf, kf = _fold.activation_fold(q, k, W, qs, ks, qr, kr, routed, variant)
    return _attend_folded(qf, kf, v, col_bias=col_bias, scale=scale, dropout_p=dropout_p, backend=backend)


def _attend_folded(qf: Tensor, kf: Tensor, v: Tensor, *, col_bias: Tensor | None, scale: float,
                   dropout_p: float, backend: str) -> Tensor:
    """Causal attention on already-folded ``Q~, K~`` with an optional column bias, on the chosen backend."""
    if backend == "triton" or (backend == "auto" and col_bias is not None and qf.device.type == "cuda"
                               and _triton_usable(qf.device) and qf.shape[-1] == v.shape[-1]
                               and qf.shape[-1] in (16, 32, 64, 128) and dropout_p == 0.0):
        from .ops.flash import flash_ra_attention

        if dropout_p:
            raise ValueError("backend='triton' does not implement attention dropout; use dropout=0 or 'sdpa'")
        return flash_ra_attention(qf, kf, v, scale=scale, col_bias=col_bias)
    if col_bias is not None:
        qf, kf = _fold.channel_fold(qf, kf, col_bias, scale)
    return _sdpa(qf, kf, v, scale=scale, dropout_p=dropout_p)


# --------------------------------------------------------------------------------------------------------------
# KV cache for generation
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LayerKVCache:
    """Per-layer generation cache: the folded keys ``K~`` (for ``full``: ``[K, Q]``), values, and the content bias.

    Every RA variant's logit for key ``j`` depends on position ``j`` only through per-position vectors, so those
    are cached and new queries attend to them.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    bias: Tensor | None = None  # content discoverability [B, H, T] so far
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append one chunk and return everything cached."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        if bias is not None:
            self.bias = bias if self.bias is None else torch.cat([self.bias, bias], dim=-1)
        return self.k, self.v, self.bias


# --------------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------------

class ReciprocalAttention(nn.Module):
    """GPT-2 causal self-attention with Reciprocal Attention (RA-SPEC sections 2-3).

    ``x [B, T, C] -> c_attn -> RA attention per head -> c_proj -> [B, T, C]``. Parameters: ``c_attn``, ``c_proj``
    and, for RA variants, ``W_recip [D, R]`` (``low_rank``/``same_flop``), gates ``w_std, w_rec, w_disc [H]``,
    ``d_bias [H, block_size]`` (positional discoverability) or ``u [H, D]`` (content discoverability).

    ``cache_fold`` (attribute, default True): keep the folded ``c_attn`` weight between calls while the parameters
    are unchanged (see :meth:`folded_weight`). It costs one folded weight per layer (``(2 H D' + C) x C``, 3.4 MiB at
    GPT-2 small in bf16; 1.056x the baseline block's peak memory for a no-grad forward at B=8, T=1024) and buys the
    baseline's exact inference cost; set it False to fold on every call instead (+~5 us per layer and call).
    """

    cache_fold: bool = True

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        rank: int = 8,
        variant: str = "same_flop",
        gates: str = "signed",
        routing_threshold: float | None = None,
        discoverability: str | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        block_size: int = 1024,
        backend: str = "auto",
        output_gate: bool = False,
        init: dict[str, float] | None = None,
        bias_channel: bool = False,
    ) -> None:
        super().__init__()
        for name, val in (("n_embd", n_embd), ("n_head", n_head), ("block_size", block_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int; got {val!r}")
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd must be divisible by n_head; got n_embd={n_embd}, n_head={n_head}")
        check_choice("variant", variant, VARIANTS)
        check_choice("gates", gates, GATES)
        check_choice("discoverability", discoverability, DISCOVERABILITY)
        check_choice("backend", backend, BACKENDS)
        D = n_embd // n_head
        if variant in _fold.FOLDED_VARIANTS and (isinstance(rank, bool) or not isinstance(rank, int)
                                                 or not 1 <= rank <= D - 1):
            raise ValueError(f"rank must be an int in [1, D-1] = [1, {D - 1}] (D = n_embd/n_head = {D}); "
                             f"got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if bias_channel and (variant != "same_flop" or discoverability is None or routing_threshold is not None
                             or not isinstance(rank, int) or rank > D - 2):
            raise ValueError("bias_channel reserves one Q/K feature per head for the discoverability bias (RA-SPEC "
                             "3.3): it needs variant='same_flop', a discoverability kind, no routing and rank <= "
                             f"D-2 = {D - 2}; got variant={variant!r}, discoverability={discoverability!r}, "
                             f"routing_threshold={routing_threshold!r}, rank={rank!r}")
        if routing_threshold is not None and variant == "standard":
            raise ValueError("routing_threshold needs an RA variant (full, low_rank, same_flop); "
                             "variant='standard' has no w_rec to route on")
        self.n_embd, self.n_head, self.head_dim = n_embd, n_head, D
        self.rank = rank if variant in _fold.FOLDED_VARIANTS else 0
        self.variant, self.gates, self.routing_threshold = variant, gates, routing_threshold
        self.discoverability, self.block_size, self.backend = discoverability, block_size, backend
        self.dropout = dropout
        self.bias_channel = bias_channel
        self.center_bias = False  # the seed's mean-subtraction of d_bias (a softmax no-op); on for the seed preset
        init = dict(_DEFAULT_INIT, **(init or {}))

        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        if variant != "standard":
            self.w_std = nn.Parameter(torch.full((n_head,), float(init["w_std"])))
            self.w_rec = nn.Parameter(torch.full((n_head,), float(init["w_rec"])))
        if variant in _fold.FOLDED_VARIANTS:
            self.W_recip = nn.Parameter(torch.empty(D, self.rank))
        if discoverability is not None or init.get("seed_params"):
            self.w_disc = nn.Parameter(torch.full((n_head,), float(init["w_disc"])))
        if discoverability == "positional" or init.get("seed_params"):
            self.d_bias = nn.Parameter(torch.zeros(n_head, block_size))
        if discoverability is None and init.get("seed_params"):  # the seed's names and shapes, unused: frozen
            self.w_disc.requires_grad_(False)
            self.d_bias.requires_grad_(False)
        if discoverability == "content":
            self.u = nn.Parameter(torch.empty(n_head, D))
        if output_gate:
            self.out_gate = nn.Parameter(torch.zeros(n_head))  # 2*sigmoid(0) = 1: identity at init
        self.output_gate = output_gate
        self._init = init
        self._fold_cache: tuple[tuple, Tensor, Tensor | None] | None = None
        self.reset_ra_parameters()

    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, *, n_embd: int, n_head: int, block_size: int = 1024,
                    **overrides: Any) -> "ReciprocalAttention":
        """Build a named configuration. See :data:`PRESETS` and the README for what each one is and why.

        ``seed``: RA Ultimate v2 exactly (same_flop, R=8, routing at 0.1, seed gates and init, bias-free
        ``c_attn``/``c_proj``, discoverability off, seed parameter names and shapes).
        ``ra``: the recommended preset (same_flop, R=8, signed gates, no routing, GPT-2 biases, an init that
        starts RA at standard attention's temperature with a reciprocal term of comparable size).
        """
        check_choice("preset", name, PRESETS)
        kw: dict[str, Any] = dict(_PRESETS[name])
        init = dict(kw.pop("init", {}))
        init.update(overrides.pop("init", {}) or {})
        kw.update(overrides)
        mod = cls(n_embd=n_embd, n_head=n_head, block_size=block_size, init=init, **kw)
        if name == "seed":
            mod.center_bias = True
        mod.preset = name
        return mod

    def reset_ra_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise the RA-only parameters from the init recipe (``W_recip``, ``u``, gates, ``d_bias``)."""
        init = self._init
        with torch.no_grad():
            if hasattr(self, "W_recip"):
                D, R = self.W_recip.shape
                if init["W_recip"] == "orthogonal":
                    g = torch.randn(D, R, generator=generator, dtype=torch.float64)
                    qmat, _ = torch.linalg.qr(g)
                    self.W_recip.copy_(qmat.to(self.W_recip.dtype))
                else:
                    self.W_recip.normal_(0.0, float(init["W_recip"]), generator=generator)
            if hasattr(self, "u"):
                self.u.normal_(0.0, 1.0 / math.sqrt(self.head_dim), generator=generator)
            for name in ("w_std", "w_rec", "w_disc"):
                if hasattr(self, name):
                    getattr(self, name).fill_(float(init[name]))
            if hasattr(self, "d_bias"):
                self.d_bias.zero_()
            if hasattr(self, "out_gate"):
                self.out_gate.zero_()
        self.invalidate_cache()

    def extra_repr(self) -> str:
        return (f"n_embd={self.n_embd}, n_head={self.n_head}, variant={self.variant!r}, rank={self.rank}, "
                f"gates={self.gates!r}, routing_threshold={self.routing_threshold}, "
                f"discoverability={self.discoverability!r}, bias_channel={self.bias_channel}, "
                f"backend={self.backend!r}")

    # ---------------------------------------------------------------------------------------------------------
    # Backend choice
    # ---------------------------------------------------------------------------------------------------------
    def explain_backend(self, device: torch.device | str | None = None) -> tuple[str, str]:
        """``(backend, reason)`` this module uses on ``device`` (default: where its parameters are)."""
        device = torch.device(device) if device is not None else self.c_attn.weight.device
        D = self.head_dim
        if self.backend != "auto":
            return self.backend, "requested explicitly"
        wants_triton = self.discoverability is not None or self.variant == "full"
        if not wants_triton:
            return "sdpa", "no column bias and no full-rank term: a standard SDPA kernel on the fold is fastest"
        if self.bias_channel:
            return "sdpa", "the column bias rides in the reserved Q/K feature: the baseline's SDPA kernel at width D"
        if device.type != "cuda":
            return "sdpa", f"the fused Triton kernels need CUDA; device is {device.type} (exact channel fold/padding)"
        if not TRITON_AVAILABLE:
            return "sdpa", "triton is not installed (exact channel fold/padding through SDPA instead)"
        if D not in (16, 32, 64, 128):
            return "sdpa", f"head width {D} is not one the Triton kernel supports (16/32/64/128)"
        if self.variant == "low_rank":
            return "sdpa", "low_rank has Q/K width D+R != V width D, which the Triton kernel does not take"
        if self.dropout > 0:
            return "sdpa", "attention dropout is not implemented in the Triton kernel"
        return "triton", "CUDA + column bias or full-rank S+S^T: the fused kernel computes it without T x T memory"

    # ---------------------------------------------------------------------------------------------------------
    # Folded weight and its cache
    # ---------------------------------------------------------------------------------------------------------
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

    def folded_weight(self, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        """The folded ``c_attn`` weight/bias emitting ``[Q~ | K~ | V]``, rebuilt only when a parameter changed.

        The fold is cached under a key of every parameter's version counter, storage and dtype plus the global
        optimizer-step count. Without autograd a hit returns the cached tensors (eval costs exactly the baseline).
        With autograd on the fused path, a hit skips the fold's forward kernel and keeps its backward (gradient
        accumulation over micro-batches, repeated calls between optimizer steps); that path neither reads nor
        writes the cache while a CUDA graph is captured (a training replay must rebuild the fold from the
        parameters). Nothing is cached while torch.compile traces. Writes through ``param.data`` (manual
        ``p.data.sub_(...)`` updates, some EMA code) bypass version counters in training too: call
        ``invalidate_cache()`` after them.
        """
        params = self._fold_params()
        weight, W, w_std, w_rec = params[:4]
        bias = params[4] if len(params) == 5 else None
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        fused = _fused_fold_usable(weight)
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
            wf, bf = fold_qkv(weight, bias, W, *self._gate_sides(), self._routed(), self.n_head, self.variant,
                              out_dtype=out_dtype, impl="torch", bias_channel=self.bias_channel)
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
        return tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in params) + (
            out_dtype, _OPTIMIZER_STEPS[0])

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
        on CUDA go through one autograd node (GEMM + the fold's backward, ``kernels.folded_linear``) with the
        fold from the cache when the parameters are unchanged; everything else through :meth:`folded_weight`."""
        params = self._fold_params()
        weight = params[0]
        if (torch.is_grad_enabled() and _fused_fold_usable(weight) and any(p.requires_grad for p in params)
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
        wf, bf = self.folded_weight(out_dtype=out_dtype)
        return F.linear(x2d, wf, bf)

    def train(self, mode: bool = True) -> "ReciprocalAttention":  # a mode switch never keeps a cached fold
        self.invalidate_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(): the cache must not survive
        self.invalidate_cache()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    # ---------------------------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, offset: int) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape [B, T, C]; got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"x must have shape [B, T, C] with C = n_embd = {self.n_embd}; got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        w = self.c_attn.weight
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the module's parameters are on {w.device}; move one of them")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the module's parameters have {w.dtype}; cast one of them "
                            f"or run under torch.autocast")
        T = x.shape[1]
        if T < 1:
            raise ValueError("x must have at least one position (T >= 1)")
        if self.discoverability == "positional" and offset + T > self.block_size:
            raise ValueError(f"positional discoverability covers block_size = {self.block_size} positions; got "
                             f"T = {offset + T} (cached {offset} + new {T})")

    def _split_heads(self, t: Tensor, B: int, T: int, width: int) -> Tensor:
        return t.view(B, T, self.n_head, width).transpose(1, 2)

    def _column_bias(self, k: Tensor | None, T: int) -> Tensor | None:
        if self.discoverability is None:
            return None
        if self.discoverability == "positional":
            return discoverability_bias("positional", self.w_disc, d_bias=self.d_bias, T=T, center=self.center_bias)
        return discoverability_bias("content", self.w_disc, u=self.u, k=k)

    def _add_bias_channel(self, qkv: Tensor, k_raw: Tensor | None, T: int, width: int, scale: float) -> Tensor:
        """Write the column bias into the reserved Q/K feature of the 2-D folded GEMM output, in place: fused
        kernels on eager/graph CUDA calls (the positional bias formed inside them), PyTorch ops otherwise."""
        q_channel = self.c_attn.bias is None  # with a bias, the folded bias already holds kappa = 1
        if _fused_channel_usable(qkv):
            from .ops import channel

            if self.discoverability == "positional" and not self.center_bias:
                return channel.add_positional_bias_channel_fused(qkv, self.w_disc, self.d_bias, T, self.n_head,
                                                                 width, scale, q_channel=q_channel)
            return channel.add_bias_channel_fused(qkv, self._column_bias(k_raw, T), self.n_head, width, scale,
                                                  q_channel=q_channel)
        return _fold.add_bias_channel(qkv, self._column_bias(k_raw, T), self.n_head, width, scale,
                                      q_channel=q_channel)

    def forward(self, x: Tensor, cache: LayerKVCache | None = None) -> Tensor:
        """``x [B, T, C] -> [B, T, C]``. With ``cache``, ``x`` is the next chunk and its keys are appended."""
        offset = cache.length if cache is not None else 0
        self._check_input(x, offset)
        B, T, C = x.shape
        D = self.head_dim
        scale = 1.0 / math.sqrt(D)
        backend, _ = self.explain_backend(x.device)
        dropout_p = self.dropout if self.training else 0.0

        folded = self.variant in _fold.FOLDED_VARIANTS
        if folded and backend != "reference":  # weight-space fold: one GEMM emits [Q~ | K~ | V]
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
            Dp = _fold.folded_width(self.variant, D, self.rank)
            qkv = self._qkv(x.reshape(B * T, C), dtype)  # 2-D: a base tensor, which add_bias_channel updates
            k_raw = None
            if self.discoverability == "content":  # the content bias needs the unfolded keys
                bk = None if self.c_attn.bias is None else self.c_attn.bias[C:2 * C]
                k_raw = self._split_heads(F.linear(x, self.c_attn.weight[C:2 * C], bk), B, T, D)
            if self.bias_channel and cache is None and backend == "sdpa":  # the bias rides in the reserved feature
                qkv = self._add_bias_channel(qkv, k_raw, T, Dp, scale)
                col_bias = None
            else:
                col_bias = self._column_bias(k_raw, offset + T)
            q, k, v = qkv.view(B, T, -1).split([self.n_head * Dp, self.n_head * Dp, C], dim=2)
            q, k, v = self._split_heads(q, B, T, Dp), self._split_heads(k, B, T, Dp), self._split_heads(v, B, T, D)
        else:
            q, k, v = (self._split_heads(t, B, T, D) for t in self.c_attn(x).split(C, dim=2))
            col_bias = self._column_bias(k, offset + T)

        if cache is not None:
            if folded and backend == "reference":
                q, k = _fold.activation_fold(q, k, self.W_recip, *self._gate_sides(), self._routed(), self.variant,
                                             self.bias_channel)
            elif self.variant == "full":  # logit_ij = a q_i.k_j + b q_j.k_i: cache [k_j, q_j]
                q, k = _fold.full_qk(q, k, *self._gate_sides(), routed=self._routed())
            y = self._attend_cached(q, k, v, col_bias, cache, scale)
        elif backend == "reference":
            y = self._reference_core(q, k, v, col_bias, scale, dropout_p)
        elif folded:
            y = _attend_folded(q, k, v, col_bias=col_bias, scale=scale, dropout_p=dropout_p, backend=backend)
        else:
            y = reciprocal_attention(
                q, k, v, variant=self.variant, w_std=getattr(self, "w_std", None),
                w_rec=getattr(self, "w_rec", None), gates=self.gates, routing_threshold=self.routing_threshold,
                col_bias=col_bias, scale=scale, dropout_p=dropout_p, backend=backend)

        if self.output_gate:
            y = y * (2.0 * torch.sigmoid(self.out_gate)).view(1, -1, 1, 1).to(y.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _reference_core(self, q: Tensor, k: Tensor, v: Tensor, col_bias: Tensor | None, scale: float,
                        dropout_p: float) -> Tensor:
        from .reference import ra_logits

        logits = ra_logits(q, k, variant=self.variant, W=getattr(self, "W_recip", None),
                           w_std=getattr(self, "w_std", None), w_rec=getattr(self, "w_rec", None), gates=self.gates,
                           routing_threshold=self.routing_threshold, col_bias=col_bias, scale=scale,
                           d_std=self.head_dim - self.rank - 1 if self.bias_channel else None)
        probs = F.dropout(torch.softmax(logits, dim=-1), p=dropout_p, training=dropout_p > 0)
        return probs @ v

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, col_bias: Tensor | None, cache: LayerKVCache,
                       scale: float) -> Tensor:
        """Attention of a new chunk against everything cached (generation); ``q, k`` are already folded."""
        T_new = q.shape[2]
        offset = cache.length
        content_bias = col_bias if self.discoverability == "content" else None
        k_all, v_all, bias_all = cache.append(k, v, content_bias)
        T_all = k_all.shape[2]
        visible = torch.ones(T_new, T_all, dtype=torch.bool, device=q.device).tril(diagonal=offset)
        mask = torch.zeros(T_new, T_all, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
        if self.discoverability == "positional":
            mask = mask + col_bias[:, :T_all].to(q.dtype).unsqueeze(1)  # [H, 1, T_all] + [T_new, T_all]
        elif self.discoverability == "content":
            mask = mask + bias_all.to(q.dtype).unsqueeze(2)  # [B, H, 1, T_all]
        return _sdpa(q, k_all, v_all, scale=scale, dropout_p=0.0, causal=False, attn_mask=mask)


_DEFAULT_INIT: dict[str, Any] = {"w_std": 1.0, "w_rec": 1.0, "w_disc": 1.0, "W_recip": "orthogonal"}

_PRESETS: dict[str, dict[str, Any]] = {
    "standard": {"variant": "standard"},
    "seed": {"variant": "same_flop", "rank": 8, "gates": "seed", "routing_threshold": 0.1, "bias": False,
             "discoverability": None,
             "init": {"w_std": 0.5, "w_rec": 0.3, "w_disc": 0.2, "W_recip": 0.02, "seed_params": True}},
    "ra": {"variant": "same_flop", "rank": 8, "gates": "signed"},
    "ra_disc": {"variant": "same_flop", "rank": 8, "gates": "signed", "discoverability": "positional"},
    # RA-SPEC 3.3: R-1 = 7 reciprocal features + 1 bias feature, so the bias costs no width and no kernel change
    "ra_disc_channel": {"variant": "same_flop", "rank": 7, "gates": "signed", "discoverability": "positional",
                        "bias_channel": True},
    "full": {"variant": "full", "gates": "signed", "init": {"w_std": 1.0, "w_rec": 0.5}},
    "low_rank": {"variant": "low_rank", "rank": 8, "gates": "signed"},
    "output_gate": {"variant": "standard", "output_gate": True},
}
