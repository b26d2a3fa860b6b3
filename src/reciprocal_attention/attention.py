"""``ReciprocalAttention``: a drop-in GPT-2 causal self-attention with every RA variant (RA-SPEC sections 2-3).

The module chooses its plan once (:mod:`reciprocal_attention.plan`: QKV projection, attention core, bias handling),
at construction and on ``.to()``; ``forward`` then reads as the math: project, (bias channel), attend, project out.
:meth:`ReciprocalAttention.project_heads` / :meth:`ReciprocalAttention.project_out` expose the same pieces for
callers with their own masks and caches (generation, the Hugging Face adapter).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import fold as _fold
from .attention_args import DEFAULT_INIT, PRESET_ARGS, PRESETS, check_arguments
from .cache import LayerKVCache
from .fold import check_choice
from .fold_cache import FoldedProjection
from .functional import BACKENDS, attend, sdpa
from .ops import eager_launch
from .plan import Plan, choose_plan


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    kind = "cuda" if x.is_cuda else x.device.type  # is_cuda: no device object per call (decoding is host-bound)
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class ReciprocalAttention(FoldedProjection, nn.Module):
    """GPT-2 causal self-attention with Reciprocal Attention: ``x [B, T, C] -> [B, T, C]``.

    ``c_attn -> RA attention per head -> c_proj``. Build one with :meth:`from_preset` (``standard``, ``seed``,
    ``ra``, ``ra_disc``, ``ra_disc_channel``, ``full``, ``low_rank``, ``output_gate``) or with the arguments:

    * ``n_embd`` (``C``), ``n_head`` (``H``): positive ints, ``C`` divisible by ``H``; head width ``D = C / H``.
    * ``rank``: ``R``, an int in ``[1, D-1]`` for ``low_rank``/``same_flop`` (ignored otherwise).
    * ``variant``: ``"standard"`` | ``"full"`` (``a S + b S^T``) | ``"low_rank"`` (Q/K width ``D+R``) |
      ``"same_flop"`` (RA Ultimate v2: ``D-R`` standard + ``R`` reciprocal features, the baseline's FLOPs).
    * ``gates``: ``"signed"`` (``w`` on the Q side: any sign, no dead zone) | ``"seed"``
      (``sqrt(clamp_min(w, 1e-8))`` on both sides).
    * ``routing_threshold``: ``None`` or a float; a head with ``w_rec <= threshold`` takes the standard logit.
    * ``discoverability``: ``None`` | ``"positional"`` (``w_disc[h] * d_bias[h, j]``) | ``"content"``
      (``w_disc[h] * <k_j, u_h>``): a learned per-key column bias.
    * ``bias_channel``: carry the column bias in one reserved Q/K feature (``same_flop``, ``rank <= D-2``, no
      routing; RA-SPEC 3.3), so the baseline's SDPA kernel computes it.
    * ``bias``: GPT-2 biases on ``c_attn``/``c_proj``. ``dropout``: in ``[0, 1)``. ``block_size``: positions the
      positional bias covers. ``output_gate``: a learned per-head output gate ``2 sigmoid(g_h)`` (a control arm).
    * ``backend``: ``"auto"`` | ``"sdpa"`` | ``"triton"`` (fused kernels, CUDA) | ``"reference"`` (float64 oracle).
      :meth:`explain_backend` says what ``"auto"`` picks and why; :attr:`plan` shows the whole plan.
    * ``init``: overrides of the RA parameters' init recipe (``w_std``, ``w_rec``, ``w_disc``, ``W_recip``: a std
      or ``"orthogonal"``).

    Parameters: ``c_attn``, ``c_proj`` and, for RA variants, ``W_recip [D, R]``, gates ``w_std, w_rec [H]``,
    ``w_disc [H]`` with ``d_bias [H, block_size]`` or ``u [H, D]``, ``out_gate [H]``.
    ``cache_fold`` (attribute, default True): keep the folded ``c_attn`` weight between calls while the parameters
    are unchanged (3.4 MiB per layer at GPT-2 small in bf16); False folds on every call instead.
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
        """See the class docstring for every argument and its allowed values."""
        super().__init__()
        D = check_arguments(n_embd, n_head, rank, variant, gates, routing_threshold, discoverability, dropout,
                             block_size, backend, bias_channel)
        self.n_embd, self.n_head, self.head_dim = n_embd, n_head, D
        self.rank = rank if variant in _fold.FOLDED_VARIANTS else 0
        self.variant, self.gates, self.routing_threshold = variant, gates, routing_threshold
        self.discoverability, self.block_size = discoverability, block_size
        self._backend, self._dropout = backend, dropout
        self.bias_channel = bias_channel
        self.center_bias = False  # the seed's mean-subtraction of d_bias (a softmax no-op); on for the seed preset
        init = dict(DEFAULT_INIT, **(init or {}))

        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self._add_ra_parameters(init, output_gate)
        self.output_gate = output_gate
        self._init = init
        self._fold_cache: tuple[tuple, Tensor, Tensor | None] | None = None
        self.scale = 1.0 / math.sqrt(D)
        self._replan()
        self.reset_ra_parameters()

    def _add_ra_parameters(self, init: dict[str, float], output_gate: bool) -> None:
        """The RA parameters of the chosen variant (gates, reciprocal map, discoverability, output gate)."""
        if self.variant != "standard":
            self.w_std = nn.Parameter(torch.full((self.n_head,), float(init["w_std"])))
            self.w_rec = nn.Parameter(torch.full((self.n_head,), float(init["w_rec"])))
        if self.variant in _fold.FOLDED_VARIANTS:
            self.W_recip = nn.Parameter(torch.empty(self.head_dim, self.rank))
        if self.discoverability is not None or init.get("seed_params"):
            self.w_disc = nn.Parameter(torch.full((self.n_head,), float(init["w_disc"])))
        if self.discoverability == "positional" or init.get("seed_params"):
            self.d_bias = nn.Parameter(torch.zeros(self.n_head, self.block_size))
        if self.discoverability is None and init.get("seed_params"):  # the seed's names and shapes, unused: frozen
            self.w_disc.requires_grad_(False)
            self.d_bias.requires_grad_(False)
        if self.discoverability == "content":
            self.u = nn.Parameter(torch.empty(self.n_head, self.head_dim))
        if output_gate:
            self.out_gate = nn.Parameter(torch.zeros(self.n_head))  # 2*sigmoid(0) = 1: identity at init

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
        kw: dict[str, Any] = dict(PRESET_ARGS[name])
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
    # The plan: chosen at construction and whenever the parameters move or change dtype
    # ---------------------------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """How this module runs (:class:`reciprocal_attention.plan.Plan`)."""
        return self._plan

    @property
    def backend(self) -> str:
        """The requested attention backend (``auto``, ``reference``, ``sdpa``, ``triton``)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        check_choice("backend", value, BACKENDS)
        self._backend = value
        self._replan()

    @property
    def dropout(self) -> float:
        """Attention dropout probability (training only)."""
        return self._dropout

    @dropout.setter
    def dropout(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ValueError(f"dropout must be in [0, 1); got {value!r}")
        self._dropout = float(value)
        self._replan()

    def _replan(self) -> None:
        w = self.c_attn.weight
        self.__dict__["_plan"] = choose_plan(self, w.device, w.dtype)

    def explain_backend(self, device: torch.device | str | None = None) -> tuple[str, str]:
        """``(backend, reason)``: the attention core this module uses on ``device`` (default: its parameters')."""
        if device is None:
            return self._plan.core, self._plan.reason
        plan = choose_plan(self, torch.device(device), self.c_attn.weight.dtype)
        return plan.core, plan.reason

    def train(self, mode: bool = True) -> "ReciprocalAttention":  # a mode switch never keeps a cached fold
        self.invalidate_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(): new plan, no stale fold
        self.invalidate_cache()
        out = super()._apply(fn, recurse)
        self._replan()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self.invalidate_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    # ---------------------------------------------------------------------------------------------------------
    # Forward: project -> (bias channel) -> attend -> project out
    # ---------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: LayerKVCache | None = None) -> Tensor:
        """``x [B, T, C] -> [B, T, C]``. With ``cache``, ``x`` is the next chunk and its keys are appended."""
        offset = cache.length if cache is not None else 0
        self._check_input(x, offset)
        if x.shape[0] == 0:
            return x.new_zeros(x.shape)
        if cache is not None:
            return self.project_out(self._attend_cached(x, cache, offset))
        q, k, v, col_bias = self._project(x)
        return self.project_out(self._attend(q, k, v, col_bias))

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(Q~, K~, V, column bias or None)`` in the form the plan's attention core takes."""
        B, T, C = x.shape
        if self._plan.qkv == "linear":
            q, k, v = self._split_heads(self.c_attn(x), B, T, self.head_dim)
            return q, k, v, self._column_bias(k, T)
        qkv = self._qkv(x.reshape(B * T, C), _autocast_dtype(x))  # 2-D: a base tensor the bias channel updates
        k_raw = self._raw_keys(x) if self.discoverability == "content" else None
        channel = self._plan.bias in ("channel", "channel_fused")
        traced = channel and torch.compiler.is_compiling()  # a constant to dynamo: the graph has one of the two
        if channel and not traced:  # in place on the GEMM output
            qkv = self._add_bias_channel(qkv, k_raw, T)
        q, k, v = self._split_heads(qkv, B, T, _fold.folded_width(self.variant, self.head_dim, self.rank))
        if channel and traced:  # out of place on the heads (fold.add_bias_channel_heads says why)
            q, k = _fold.add_bias_channel_heads(q, k, self._column_bias(k_raw, T), self.scale,
                                                q_channel=self.c_attn.bias is None)
        return q, k, v, (None if channel else self._column_bias(k_raw, T))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, col_bias: Tensor | None) -> Tensor:
        """The plan's attention core -> ``[B, H, T, D]``."""
        core = self._plan.core
        dropout_p = self._dropout if self.training else 0.0
        if core == "reference":
            return self._reference_core(q, k, v, col_bias, dropout_p)
        a = b = None
        if self.variant == "full":
            qs, ks, qr, kr = self._gate_sides()
            routed = self._routed()
            if routed is not None:  # a routed head keeps only a_h q_i.k_j
                qr = torch.where(routed, torch.zeros_like(qr), qr)
            if core == "triton":
                a, b = qs * ks, qr * kr
            else:
                q, k = _fold.full_qk(q, k, qs, ks, qr, kr)
        return attend(q, k, v, col_bias=col_bias, scale=self.scale, dropout_p=dropout_p, triton=core == "triton",
                      a=a, b=b)

    def project_heads(self, x: Tensor, positions: Tensor | None = None,
                      scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``Q~, K~ [B, H, T, D']`` and ``V [B, H, T, D]`` with ``softmax(scale Q~ K~^T + mask) V`` this layer's
        attention core for any mask: the reciprocal term folded into the width, ``full`` as ``[a q, b k].[k, q]``,
        the column bias (at absolute key ``positions`` ``[T]`` or ``[B, T]``, default ``arange(T)``) in one Q/K
        feature scaled for ``scale`` (default ``1/sqrt(D)``). V is narrower than Q/K where features were added:
        zero-pad it for SDPA."""
        B, T, C = x.shape
        scale = self.scale if scale is None else scale
        in_place_channel = self.bias_channel and not torch.compiler.is_compiling()  # see _project
        if self.variant in _fold.FOLDED_VARIANTS:
            qkv = self._qkv(x.reshape(B * T, C), _autocast_dtype(x))
        else:
            qkv = self.c_attn(x).reshape(B * T, 3 * C)
        if self.discoverability is not None:
            if positions is None:
                positions = torch.arange(T, device=x.device)
            if self.discoverability == "positional":
                col = _fold.positional_bias(self.w_disc, self.d_bias, positions)
            else:
                col = _fold.content_bias(self.w_disc, self.u, self._raw_keys(x))
            if in_place_channel:  # the reserved feature of the folded head
                qkv = _fold.add_bias_channel(qkv, col, self.n_head, self.head_dim, scale,
                                             q_channel=self.c_attn.bias is None)
        width = _fold.folded_width(self.variant, self.head_dim, self.rank) if self.rank else self.head_dim
        q, k, v = self._split_heads(qkv, B, T, width)
        if self.discoverability is not None and self.bias_channel and not in_place_channel:
            q, k = _fold.add_bias_channel_heads(q, k, col, scale, q_channel=self.c_attn.bias is None)
        if self.variant == "full":
            q, k = _fold.full_qk(q, k, *self._gate_sides(), routed=self._routed())
        if self.discoverability is not None and not self.bias_channel:
            q, k = _fold.channel_fold(q, k, col, scale)
        return q, k, v

    def project_out(self, y: Tensor) -> Tensor:
        """``y [B, H, T, D]`` -> output gate, merged heads, ``c_proj``, residual dropout -> ``[B, T, C]``."""
        if self.output_gate:
            y = y * (2.0 * torch.sigmoid(self.out_gate)).view(1, -1, 1, 1).to(y.dtype)
        B, H, T, D = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, H * D)))

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

    def _split_heads(self, qkv: Tensor, B: int, T: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """``[.., 2 H width + C]`` -> ``Q~, K~ [B, H, T, width]`` and ``V [B, H, T, D]`` (explicit sizes: B may be 0)."""
        H, D = self.n_head, self.head_dim
        q, k, v = qkv.view(B, T, 2 * H * width + H * D).split([H * width, H * width, H * D], dim=2)
        return (q.view(B, T, H, width).transpose(1, 2), k.view(B, T, H, width).transpose(1, 2),
                v.view(B, T, H, D).transpose(1, 2))

    def _raw_keys(self, x: Tensor) -> Tensor:
        """The unfolded keys ``[B, H, T, D]`` (the content bias needs them)."""
        B, T, C = x.shape
        bk = None if self.c_attn.bias is None else self.c_attn.bias[C:2 * C]
        k = F.linear(x, self.c_attn.weight[C:2 * C], bk)
        return k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def _column_bias(self, k_raw: Tensor | None, T: int) -> Tensor | None:
        if self.discoverability is None:
            return None
        if self.discoverability == "positional":
            d = self.d_bias[:, :T]
            if self.center_bias:
                d = d - d.mean(dim=-1, keepdim=True)
            return self.w_disc.view(-1, 1) * d
        return _fold.content_bias(self.w_disc, self.u, k_raw)

    def _add_bias_channel(self, qkv: Tensor, k_raw: Tensor | None, T: int) -> Tensor:
        """Write the column bias into the reserved Q/K feature of the 2-D folded GEMM output, in place: fused
        kernels on eager/graph CUDA calls (the positional bias formed inside them), PyTorch ops otherwise."""
        q_channel = self.c_attn.bias is None  # with a bias, the folded bias already holds kappa = 1
        width = self.head_dim
        if self._plan.bias == "channel_fused" and eager_launch(qkv):
            from .ops import channel

            if self.discoverability == "positional" and not self.center_bias:
                return channel.add_positional_bias_channel_fused(qkv, self.w_disc, self.d_bias, T, self.n_head,
                                                                 width, self.scale, q_channel=q_channel)
            return channel.add_bias_channel_fused(qkv, self._column_bias(k_raw, T), self.n_head, width,
                                                  self.scale, q_channel=q_channel)
        return _fold.add_bias_channel(qkv, self._column_bias(k_raw, T), self.n_head, width, self.scale,
                                      q_channel=q_channel)

    def _reference_core(self, q: Tensor, k: Tensor, v: Tensor, col_bias: Tensor | None,
                        dropout_p: float) -> Tensor:
        from .reference import ra_logits

        logits = ra_logits(q, k, variant=self.variant, W=getattr(self, "W_recip", None),
                           w_std=getattr(self, "w_std", None), w_rec=getattr(self, "w_rec", None), gates=self.gates,
                           routing_threshold=self.routing_threshold, col_bias=col_bias, scale=self.scale,
                           d_std=self.head_dim - self.rank - 1 if self.bias_channel else None)
        probs = F.dropout(torch.softmax(logits, dim=-1), p=dropout_p, training=dropout_p > 0)
        return probs @ v

    def _attend_cached(self, x: Tensor, cache: LayerKVCache, offset: int) -> Tensor:
        """Attention of the chunk ``x`` against everything cached (generation): keys from :meth:`project_heads`."""
        T = x.shape[1]
        q, k, v = self.project_heads(x, positions=torch.arange(offset, offset + T, device=x.device))
        k_all, v_all = cache.append(k, v)
        visible = torch.ones(T, k_all.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=offset)
        return sdpa(q, k_all, v_all, scale=self.scale, causal=False, attn_mask=visible)
