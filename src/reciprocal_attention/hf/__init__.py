"""Retrofit Reciprocal Attention into Hugging Face GPT-2 models (GitHub issue 8).

    from transformers import GPT2LMHeadModel
    from reciprocal_attention.hf import convert_gpt2, save_converted, load_converted, unconvert_gpt2

    model = GPT2LMHeadModel(config)                # or a checkpoint you already have on disk
    convert_gpt2(model, layers="all")              # same function as before, RA terms off but trainable
    ...fine-tune...
    save_converted(model, "run/ra-gpt2")           # model.safetensors + ra_conversion.json
    model = load_converted("run/ra-gpt2")

API
---
* :func:`convert_gpt2` ``(model, layers="all", preset="low_rank", *, seed=0, **overrides) -> model``: in place.
  Each chosen block's ``attn`` becomes a :class:`GPT2ReciprocalAttention`, a wrapper around a
  :class:`~reciprocal_attention.attention.ReciprocalAttention` (``wrapper.ra``) whose ``c_attn``/``c_proj`` hold
  GPT-2's ``Conv1D`` weights transposed (``Conv1D`` stores ``[in, out]``; ``nn.Linear.weight = conv.weight.T``)
  and its biases. The gates start at ``w_std = 1``, ``w_rec = 0`` (discoverability: ``d_bias = 0``, or
  ``w_disc = 0`` for the content form), so the converted model computes exactly the original function.
* :func:`unconvert_gpt2` ``(model) -> model``: back to plain ``GPT2Attention`` wherever the wrapped function *is*
  standard attention (see its docstring); a ``ValueError`` naming the layer and parameter otherwise.
* :func:`save_converted` / :func:`load_converted`: safetensors weights + ``ra_conversion.json``.
* :func:`gpt_state_from_hf` ``(model) -> dict``: the weights under the nanoGPT-style names of
  :class:`reciprocal_attention.model.GPT`.

Why ``low_rank`` is the default conversion preset
-------------------------------------------------
RA must start *exactly* at the pretrained function and still be able to move away from it. The logit of
``low_rank`` is ``scale * (a q_i.k_j + b (k_i W).(q_j W))`` over width ``D + R``: with ``a = w_std = 1`` and
``b = w_rec = 0`` it is the standard logit over all ``D`` features, and with signed gates (``w_rec`` on the Q side
only) ``d logit / d w_rec = scale * (k_i W).(q_j W)``, which is non-zero because ``W_recip`` starts orthogonal, so
RA switches on from the first optimizer step. ``full`` (``S + S^T``) has the same property but doubles the QK
work (and pads V to 2D through SDPA); ``low_rank`` adds only ``R/D`` (8/64 = 12.5% for GPT-2 small). The
``same_flop`` presets (``ra``, ``ra_disc``, ``seed``) cannot start exactly: their standard term sees only
``D - R`` features, so ``w_rec = 0`` drops ``R`` of the ``D`` standard features; the only exact setting is head
routing (``w_rec <= threshold`` gives ``w_std q.k`` over full ``D``), and routing is absorbing (a routed head gets
no gradient to ``w_rec`` and never returns), so RA would never turn on. Those presets raise a ``ValueError``.

The wrapper in transformers
---------------------------
It has ``GPT2Attention``'s forward signature (transformers 5.x: ``hidden_states, cache, attention_mask,
encoder_hidden_states, encoder_attention_mask, output_attentions, **kwargs``; the older keyword names
``past_key_values``/``past_key_value``/``layer_past`` are accepted too) and returns ``(attn_output, attn_weights)``.
The folded ``[Q~ | K~ | V]`` comes from one GEMM (the weight-space fold, RA-SPEC 3.2; ``full`` uses
``[Q, K].[K, Q]``, 3.4); a discoverability bias rides in one extra Q/K feature (channel fold, 3.3), so the
per-key state is just ``(K~, V)`` and is stored through ``cache.update(K~, V, layer_idx)`` of any transformers
``Cache`` that grows dynamically (``DynamicCache``, the default of ``generate``). Attention runs through PyTorch
SDPA with transformers' own mask: ``None`` (causal, bottom-right aligned with a cache) or a 4-D boolean /
additive float mask, which carries left padding. GPT-2's ``scale_attn_weights``,
``scale_attn_by_inverse_layer_idx`` and (eager only, as in transformers) ``reorder_and_upcast_attn`` are honoured;
``attn_pdrop``/``resid_pdrop`` are the attention/residual dropouts; ``n_positions`` is ``block_size``.
Not supported (a clear error, never a different function): transformers < 5, attention implementations other
than ``"sdpa"``/``"eager"`` (flash-attention masks are 2-D, flex masks are ``BlockMask``), ``head_mask``, legacy
tuple caches, caches that preallocate ``head_dim`` (static) when the folded width differs from ``D``.
Attention weights: ``model(..., output_attentions=True)`` under the ``"eager"`` implementation reports the
converted layers' probabilities too (the wrapper appends them to transformers 5.x's active output collector, a
private API it degrades gracefully without; transformers' own recorder hooks ``GPT2Attention`` instances only).
Under ``"sdpa"`` no layer reports weights, converted or not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

try:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
    from transformers.cache_utils import Cache
    from transformers.models.gpt2 import modeling_gpt2 as _gpt2
except ImportError as _err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "reciprocal_attention.hf needs Hugging Face transformers, an optional dependency: install it with "
        f"`pip install 'reciprocal-attention[hf]'` (import failed: {_err})") from _err

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import fold as _fold
from ..attention import PRESETS, ReciprocalAttention
from ..reference import gate_sides, routed_heads

try:  # transformers >= 4.54 (Cache with per-layer objects)
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # pragma: no cover
    _DynamicLayer = None
try:
    from transformers.cache_utils import EncoderDecoderCache as _EncoderDecoderCache
except ImportError:  # pragma: no cover
    _EncoderDecoderCache = None
try:  # transformers 5.x records `output_attentions` through forward hooks on GPT2Attention instances only
    from transformers.utils.output_capturing import _active_collector as _collector_var
except ImportError:  # pragma: no cover
    _collector_var = None


def _attention_recorder() -> list | None:
    """The list transformers' output collector appends attention weights to, when one is active, else None."""
    if _collector_var is None:
        return None
    try:
        collected = _collector_var.get()
    except Exception:  # pragma: no cover - a private API; never let it break a forward
        return None
    if not isinstance(collected, dict) or not isinstance(collected.get("attentions"), list):
        return None
    return collected["attentions"]

__all__ = ["CONVERTIBLE_PRESETS", "DEFAULT_PRESET", "GPT2ReciprocalAttention", "GPT_ACTIVATIONS", "check_gpt_init",
           "convert_gpt2", "converted_layers", "gpt_activation", "gpt_state_from_hf", "init_gpt_from_hf",
           "layer_indices", "load_converted", "load_pretrained_gpt2", "read_gpt2_config", "save_converted",
           "unconvert_gpt2"]

DEFAULT_PRESET = "low_rank"
#: Module presets with an exact, trainable function-preserving init (``ra_disc`` only with ``variant=`` low_rank
#: or full; the check is on the resolved configuration, so overrides decide).
CONVERTIBLE_PRESETS = ("low_rank", "full", "standard", "output_gate")
FORMAT = "reciprocal_attention.hf/1"
WEIGHTS_NAME = "model.safetensors"
META_NAME = "ra_conversion.json"
_GATE_INIT = ("w_std", "w_rec", "w_disc")
_FROM_CONFIG = ("n_embd", "n_head", "block_size", "dropout")
_MODEL_CLASSES = {"GPT2LMHeadModel": GPT2LMHeadModel, "GPT2Model": GPT2Model}
#: GPT-2 ``activation_function`` -> the :class:`reciprocal_attention.model.GPTConfig` ``activation`` computing it.
GPT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
#: Weight files ``save_pretrained`` writes (single file or sharded index).
_PRETRAINED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")


def _transformers_major() -> int:
    try:
        return int(transformers.__version__.split(".")[0])
    except ValueError:  # pragma: no cover
        return 0


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------

def _base(model: nn.Module) -> GPT2Model:
    """The ``GPT2Model`` inside ``model`` (``model`` itself or ``model.transformer``)."""
    base = model if isinstance(model, GPT2Model) else getattr(model, "transformer", None)
    if not isinstance(base, GPT2Model):
        raise TypeError(f"expected a transformers GPT2Model or a model with a GPT2Model at .transformer "
                        f"(GPT2LMHeadModel, ...); got {type(model).__name__}")
    return base


def layer_indices(layers: str | Iterable[int], n_layer: int) -> list[int]:
    """Resolve ``layers``: ``"all"``, ``"none"``, ``"middle"`` (the middle third; every layer when fewer than 3,
    as :meth:`reciprocal_attention.model.GPTConfig.ra_layer_indices`) or distinct indices in ``[0, n_layer)``."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n_layer))
        if layers == "none":
            return []
        if layers == "middle":
            return list(range(n_layer // 3, n_layer - n_layer // 3)) if n_layer >= 3 else list(range(n_layer))
        raise ValueError(f"layers must be 'all', 'none', 'middle' or a list of layer indices; got {layers!r}")
    try:
        sel = list(layers)
    except TypeError:
        raise ValueError(f"layers must be 'all', 'none', 'middle' or a list of layer indices; got {layers!r}") \
            from None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in sel):
        raise ValueError(f"layers must be a list of int layer indices; got {layers!r}")
    bad = [i for i in sel if not 0 <= i < n_layer]
    if bad or len(set(sel)) != len(sel):
        raise ValueError(f"layer indices must be distinct and in [0, {n_layer}) for this {n_layer}-layer model; "
                         f"got {sel}")
    return sorted(sel)


def _layer_seed(seed: int, layer: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:hf.h.{layer}.attn".encode()).digest()[:8], "little") >> 1


def _gpt2_scaling(config: GPT2Config, layer_idx: int, head_dim: int) -> float:
    """The logit scale ``GPT2Attention`` uses for layer ``layer_idx`` (same expression, same rounding)."""
    scaling = 1.0
    if config.scale_attn_weights:
        scaling = head_dim ** -0.5
    if config.scale_attn_by_inverse_layer_idx:
        scaling /= float(layer_idx + 1)
    return scaling


def _check_attn_implementation(config: GPT2Config) -> None:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise NotImplementedError(
            f"converted GPT-2 layers support attn_implementation 'sdpa' or 'eager'; this model uses {impl!r} "
            f"(its masks are 2-D or BlockMask). Build/load it with attn_implementation='sdpa', or call "
            f"model.set_attn_implementation('sdpa') first")


def _check_exact(ra: ReciprocalAttention, preset: str) -> None:
    """Raise unless ``ra`` (gates at w_std=1, w_rec=0) is exactly standard attention and RA can still train."""
    where = f"preset {preset!r}"
    if ra.variant == "same_flop":
        extra = ""
        if preset == "seed":
            extra = (" The seed preset also has bias-free c_attn/c_proj (GPT-2 has biases) and seed gates, whose "
                     "gradient is zero at w <= 1e-8.")
        raise ValueError(
            f"{where} uses variant 'same_flop', which cannot start at GPT-2's function with RA trainable: its "
            f"standard term sees only D - R of the D features, so w_rec = 0 drops R of them. The only exact "
            f"setting is head routing (w_rec <= threshold: w_std * q.k over the full D), and routing is absorbing "
            f"(a routed head gets no gradient to w_rec and never turns RA on).{extra} Use preset='low_rank' "
            f"(the default) or 'full', or pass variant='low_rank' to keep this preset's other settings")
    if ra.variant == "standard":
        return
    if ra.gates != "signed":
        raise ValueError(
            f"{where} with gates={ra.gates!r} cannot be function-preserving: seed gates put sqrt(max(w, 1e-8)) on "
            f"both sides, so w_rec = 0 still gives a 1e-8 reciprocal coefficient, and its gradient is zero there "
            f"(RA could never turn on). Use gates='signed'")
    if ra.routing_threshold is not None and ra.routing_threshold >= 0.0:
        raise ValueError(
            f"{where} with routing_threshold={ra.routing_threshold}: the conversion starts at w_rec = 0 <= "
            f"threshold, so every head would start routed, and routing is absorbing (no gradient to w_rec, RA "
            f"never turns on). Use routing_threshold=None (or a negative threshold)")


def _ra_spec(ra: ReciprocalAttention) -> dict[str, Any]:
    """The resolved configuration of ``ra`` (public attributes), for the JSON."""
    return {"variant": ra.variant, "rank": ra.rank, "gates": ra.gates, "routing_threshold": ra.routing_threshold,
            "discoverability": ra.discoverability, "bias": ra.c_attn.bias is not None, "dropout": ra.dropout,
            "resid_dropout": ra.resid_dropout.p, "block_size": ra.block_size, "output_gate": ra.output_gate,
            "n_embd": ra.n_embd, "n_head": ra.n_head, "backend": ra.backend}


# --------------------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------------------

class GPT2ReciprocalAttention(nn.Module):
    """Drop-in replacement for one ``GPT2Attention`` (self-attention), computing RA with ``self.ra``'s parameters.

    Parameters live in ``self.ra`` (a :class:`ReciprocalAttention`: ``c_attn``/``c_proj`` as ``nn.Linear``,
    ``W_recip``, ``w_std``, ``w_rec``, ...), so the model's parameter names are ``...attn.ra.c_attn.weight`` etc.
    ``ra.dropout`` is GPT-2's ``attn_pdrop`` and ``ra.resid_dropout`` its ``resid_pdrop``.
    """

    def __init__(self, ra: ReciprocalAttention, config: GPT2Config, layer_idx: int, preset: str,
                 overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.ra = ra
        self.config = config
        self.layer_idx = layer_idx
        self.preset = preset
        self.overrides = dict(overrides or {})
        self.embed_dim, self.num_heads, self.head_dim = ra.n_embd, ra.n_head, ra.head_dim
        self.split_size = ra.n_embd
        self.is_cross_attention = False
        self.is_causal = True
        self.scaling = _gpt2_scaling(config, layer_idx, ra.head_dim)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, preset={self.preset!r}, scaling={self.scaling:.6g}"

    # ---------------------------------------------------------------------------------------------------------
    def _qkv(self, x: Tensor, position_ids: Tensor | None, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, T, C]`` -> ``Q~, K~ [B, H, T, D']`` (discoverability channel included) and ``V [B, H, T, D]``."""
        ra = self.ra
        B, T, C = x.shape
        H, D = ra.n_head, ra.head_dim

        def heads(t: Tensor, width: int) -> Tensor:
            return t.view(B, T, H, width).transpose(1, 2)

        if ra.variant in _fold.FOLDED_VARIANTS:  # weight-space fold: one GEMM emits [Q~ | K~ | V]
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
            wf, bf = ra.folded_weight(out_dtype=dtype)
            Dp = _fold.folded_width(ra.variant, D, ra.rank)
            q, k, v = F.linear(x, wf, bf).split([H * Dp, H * Dp, C], dim=2)
            q, k, v = heads(q, Dp), heads(k, Dp), heads(v, D)
        else:
            q, k, v = (heads(t, D) for t in ra.c_attn(x).split(C, dim=2))
            if ra.variant == "full":  # logit_ij = a q_i.k_j + b q_j.k_i  ->  [a q, b k] . [k, q]
                qs, ks = gate_sides(ra.w_std, ra.gates)
                qr, kr = gate_sides(ra.w_rec, ra.gates)
                q, k = _fold.full_qk(q, k, qs, ks, qr, kr, routed=routed_heads(ra.w_rec, ra.routing_threshold))
        if ra.discoverability is not None:
            col = self._column_bias(x, position_ids, offset)  # [B, H, T]
            q, k = _fold.channel_fold(q, k, col, self.scaling)
        return q, k, v

    def _column_bias(self, x: Tensor, position_ids: Tensor | None, offset: int) -> Tensor:
        ra = self.ra
        B, T, C = x.shape
        if ra.discoverability == "positional":
            if position_ids is None:
                pos = torch.arange(offset, offset + T, device=x.device).unsqueeze(0)
            else:
                pos = position_ids.reshape(-1, T).to(x.device)
            if int(pos.max()) >= ra.block_size or int(pos.min()) < 0:
                raise ValueError(f"positional discoverability covers positions [0, {ra.block_size}) "
                                 f"(n_positions); got positions up to {int(pos.max())}")
            c = ra.w_disc.view(1, -1, 1) * ra.d_bias[:, pos].transpose(0, 1)  # [B|1, H, T]
            return c.expand(B, -1, -1)
        bk = None if ra.c_attn.bias is None else ra.c_attn.bias[C:2 * C]
        k_raw = F.linear(x, ra.c_attn.weight[C:2 * C], bk).view(B, T, ra.n_head, ra.head_dim).transpose(1, 2)
        return ra.w_disc.view(1, -1, 1) * torch.einsum("bhtd,hd->bht", k_raw, ra.u)

    @staticmethod
    def _mask(attention_mask: Any, Tq: int, Tk: int, device: torch.device) -> tuple[Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for SDPA from transformers' mask (None / 4-D bool / 4-D additive float)."""
        if attention_mask is None:
            if Tq == Tk:
                return None, True
            if Tq == 1:
                return None, False
            return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq), False
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 4:
            kind = type(attention_mask).__name__ if not isinstance(attention_mask, Tensor) else \
                f"{attention_mask.dim()}-D tensor"
            raise NotImplementedError(
                f"converted GPT-2 layers take transformers' 4-D attention masks (attn_implementation 'sdpa' or "
                f"'eager'); got a {kind}. Use attn_implementation='sdpa'")
        mask = attention_mask[..., :Tk]
        if mask.shape[-2] != Tq or mask.shape[-1] != Tk:
            raise ValueError(f"attention_mask must cover [.., {Tq}, {Tk}] (queries, keys); got {list(mask.shape)}")
        return mask, False

    # ---------------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: Tensor,
        cache: Cache | None = None,
        attention_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """``GPT2Attention.forward`` (self-attention) -> ``(attn_output [B, T, C], attn_weights or None)``."""
        for alias in ("past_key_values", "past_key_value", "layer_past"):
            val = kwargs.pop(alias, None)
            if val is not None:
                if cache is not None and val is not cache:
                    raise ValueError(f"got both cache and {alias}; pass one")
                cache = val
        if encoder_hidden_states is not None:
            raise ValueError("GPT2ReciprocalAttention is a self-attention layer; cross-attention stays in the "
                             "block's (unconverted) `crossattention` module")
        if kwargs.pop("head_mask", None) is not None:
            raise NotImplementedError("head_mask is not supported by converted GPT-2 layers")
        if cache is not None and not isinstance(cache, Cache):
            raise NotImplementedError(f"converted GPT-2 layers need a transformers Cache object (DynamicCache); "
                                      f"got {type(cache).__name__} (legacy tuple caches are not supported)")
        if _EncoderDecoderCache is not None and isinstance(cache, _EncoderDecoderCache):
            cache = cache.self_attention_cache
        x = hidden_states
        ra = self.ra
        B, T, C = x.shape
        offset = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        q, k, v = self._qkv(x, kwargs.get("position_ids"), offset)
        if cache is not None:
            self._check_cache_layer(cache, k)
            k, v = cache.update(k, v, self.layer_idx)

        Tq, Tk = q.shape[2], k.shape[2]
        mask, causal = self._mask(attention_mask, Tq, Tk, q.device)
        dropout_p = ra.dropout if self.training else 0.0
        eager = getattr(self.config, "_attn_implementation", "eager") == "eager"
        upcast = eager and bool(getattr(self.config, "reorder_and_upcast_attn", False))
        weights = None
        record = _attention_recorder() if eager else None  # sdpa GPT2Attention layers record nothing either
        output_attentions = bool(output_attentions) or record is not None
        if output_attentions or upcast:
            y, weights = self._explicit_attention(q, k, v, mask, causal, dropout_p, upcast)
        else:
            if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
                # SDPA wants the query's dtype; clamp so an fp32 "min" mask does not round to -inf (NaN rows)
                mask = mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
            vp = F.pad(v, (0, q.shape[-1] - v.shape[-1])) if v.shape[-1] != q.shape[-1] else v
            y = F.scaled_dot_product_attention(q, k, vp, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                               scale=self.scaling)[..., :v.shape[-1]]
        if ra.output_gate:
            y = y * (2.0 * torch.sigmoid(ra.out_gate)).view(1, -1, 1, 1).to(y.dtype)
        y = y.transpose(1, 2).reshape(B, T, C)
        if record is not None:
            record.append(weights)
        return ra.resid_dropout(ra.c_proj(y)), (weights if output_attentions else None)

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                            dropout_p: float, upcast: bool) -> tuple[Tensor, Tensor]:
        """Materialised attention: for ``output_attentions`` and GPT-2's ``reorder_and_upcast_attn`` (fp32 logits)."""
        if upcast:
            with torch.autocast(q.device.type, enabled=False):
                logits = (q.float() @ k.float().transpose(-1, -2)) * self.scaling
        else:
            logits = (q @ k.transpose(-1, -2)) * self.scaling
        Tq, Tk = logits.shape[-2:]
        if causal:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        if mask is not None:
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
            else:  # additive, in type promotion as GPT-2's eager path (an fp32 mask keeps fp32 logits)
                logits = logits + mask
        probs = torch.softmax(logits, dim=-1).to(v.dtype)
        probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
        return probs @ v, probs

    def _check_cache_layer(self, cache: Cache, k: Tensor) -> None:
        if k.shape[-1] == self.head_dim or _DynamicLayer is None:
            return
        layers = getattr(cache, "layers", None)
        if layers is None or self.layer_idx >= len(layers):
            return
        layer = layers[self.layer_idx]
        if not isinstance(layer, _DynamicLayer):
            raise NotImplementedError(
                f"layer {self.layer_idx} caches folded keys of width {k.shape[-1]} (head_dim {self.head_dim} + RA "
                f"features), but the cache layer {type(layer).__name__} preallocates head_dim; use a DynamicCache "
                f"(generate's default cache_implementation)")

    # ---------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def to_gpt2_attention(self) -> nn.Module:
        """A plain ``GPT2Attention`` computing this layer's function, or ``ValueError`` when none exists.

        Exact cases: ``standard``; ``output_gate`` (``2 sigmoid(g_h)`` folded into ``c_proj``'s columns);
        ``same_flop`` with any gates/routing (its fold is a width-``D`` Q/K pair: RA-SPEC 2, "enlarges the
        function class: no"); ``low_rank``/``full`` where each head's reciprocal term is zero (``w_rec`` gives a
        zero Q- or K-side factor, ``W_recip == 0``, or the head is routed), with ``w_std`` folded into Q/K.
        Discoverability must be a softmax no-op: ``w_disc * d_bias`` constant along positions per head
        (positional), ``w_disc * u == 0`` per head (content).
        """
        ra = self.ra
        name = f"layer {self.layer_idx} (transformer.h.{self.layer_idx}.attn)"
        H, D, C = ra.n_head, ra.head_dim, ra.n_embd
        f64 = torch.float64
        if ra.discoverability == "positional":
            c = ra.w_disc.to(f64).view(-1, 1) * ra.d_bias.to(f64)
            bad = (c != c[:, :1]).any(dim=1).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"{name}: positional discoverability is live in heads {bad} (w_disc * d_bias "
                                 f"varies along positions); unconvert needs d_bias constant per head or w_disc == 0")
        elif ra.discoverability == "content":
            live = ((ra.w_disc.to(f64).view(-1, 1) * ra.u.to(f64)) != 0).any(dim=1).nonzero().flatten().tolist()
            if live:
                raise ValueError(f"{name}: content discoverability is live in heads {live} (w_disc * u != 0); "
                                 f"unconvert needs w_disc == 0 or u == 0 per head")
        Wa = ra.c_attn.weight.to(f64)
        ba = ra.c_attn.bias.to(f64) if ra.c_attn.bias is not None else Wa.new_zeros(3 * C)  # bias-free: zero
        if ra.variant == "standard":
            Wn, bn = Wa, ba
        else:
            qs, ks = (t.to(f64) for t in gate_sides(ra.w_std, ra.gates))
            qr, kr = (t.to(f64) for t in gate_sides(ra.w_rec, ra.gates))
            routed = routed_heads(ra.w_rec, ra.routing_threshold)
            if ra.variant in _fold.FOLDED_VARIANTS:
                Wf, bf = _fold.fold_qkv_weight(Wa, ba, ra.W_recip.to(f64), qs, ks, qr, kr, routed, H, ra.variant)
                Dp = _fold.folded_width(ra.variant, D, ra.rank)
            else:  # full: [qs q, qr k] . [ks k, kr q]; exact as standard where qr * kr == 0 (or routed)
                Dp = 2 * D
                Wq, Wk = Wa[:C].view(H, D, C), Wa[C:2 * C].view(H, D, C)
                bq, bk = ba[:C].view(H, D), ba[C:2 * C].view(H, D)
                qb = qr if routed is None else torch.where(routed, torch.zeros_like(qr), qr)

                def cat(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
                    n = a.dim()
                    return torch.cat([sa.view(-1, *[1] * (n - 1)) * a, sb.view(-1, *[1] * (n - 1)) * b], dim=1)

                Wf = torch.cat([cat(Wq, Wk, qs, qb).flatten(0, 1), cat(Wk, Wq, ks, kr).flatten(0, 1), Wa[2 * C:]])
                bf = torch.cat([cat(bq, bk, qs, qb).flatten(0, 1), cat(bk, bq, ks, kr).flatten(0, 1), ba[2 * C:]])
            if Dp != D:  # drop the extra features per head where one side of them is exactly zero
                fq = torch.cat([Wf[:H * Dp].view(H, Dp, C), bf[:H * Dp].view(H, Dp, 1)], dim=2)
                fk = torch.cat([Wf[H * Dp:2 * H * Dp].view(H, Dp, C), bf[H * Dp:2 * H * Dp].view(H, Dp, 1)], dim=2)
                dead = (fq[:, D:] == 0).flatten(1).all(dim=1) | (fk[:, D:] == 0).flatten(1).all(dim=1)
                live = (~dead).nonzero().flatten().tolist()
                if live:
                    raise ValueError(
                        f"{name}: the reciprocal term is live in heads {live} (w_rec = "
                        f"{[round(float(ra.w_rec[h]), 6) for h in live]}): variant {ra.variant!r} is then wider "
                        f"than standard attention. unconvert needs w_rec == 0 (or W_recip == 0, or the head routed)")
                Wn = torch.cat([fq[:, :D, :C].reshape(C, C), fk[:, :D, :C].reshape(C, C), Wf[2 * H * Dp:]])
                bn = torch.cat([fq[:, :D, C].reshape(C), fk[:, :D, C].reshape(C), bf[2 * H * Dp:]])
            else:
                Wn, bn = Wf, bf
        Wp = ra.c_proj.weight.to(f64)
        if ra.output_gate:
            g = (2.0 * torch.sigmoid(ra.out_gate.to(f64))).repeat_interleave(D)  # per input column of c_proj
            Wp = Wp * g.view(1, -1)
        with torch.random.fork_rng(devices=[]):  # Conv1D's init must not consume the caller's RNG stream
            attn = _gpt2.GPT2Attention(self.config, layer_idx=self.layer_idx)
        ref = ra.c_attn.weight
        attn.to(device=ref.device, dtype=ref.dtype)
        attn.c_attn.weight.copy_(Wn.t())
        attn.c_attn.bias.copy_(bn)
        attn.c_proj.weight.copy_(Wp.t())
        if ra.c_proj.bias is not None:
            attn.c_proj.bias.copy_(ra.c_proj.bias)
        else:
            attn.c_proj.bias.zero_()
        attn.train(self.training)
        return attn


# --------------------------------------------------------------------------------------------------------------
# Convert / unconvert
# --------------------------------------------------------------------------------------------------------------

def converted_layers(model: nn.Module) -> list[int]:
    """Indices of the blocks whose ``attn`` is a :class:`GPT2ReciprocalAttention`."""
    return [i for i, b in enumerate(_base(model).h) if isinstance(b.attn, GPT2ReciprocalAttention)]


def _build_ra(config: GPT2Config, layer: int, preset: str, overrides: dict[str, Any], seed: int
              ) -> ReciprocalAttention:
    C, H = config.hidden_size, config.num_attention_heads
    with torch.random.fork_rng(devices=[]):  # conversion must not consume the caller's RNG stream
        ra = ReciprocalAttention.from_preset(preset, n_embd=C, n_head=H, block_size=config.n_positions,
                                             dropout=float(config.attn_pdrop), **overrides)
    ra.resid_dropout = nn.Dropout(float(config.resid_pdrop))
    _check_exact(ra, preset)
    _check_biases(ra, preset)
    ra.reset_ra_parameters(generator=torch.Generator().manual_seed(_layer_seed(seed, layer)))
    _set_preserving_gates(ra)
    return ra


def _check_biases(ra: ReciprocalAttention, preset: str) -> None:
    if ra.c_attn.bias is None or ra.c_proj.bias is None:
        raise ValueError(f"preset {preset!r} with bias=False cannot hold GPT-2's c_attn/c_proj biases; "
                         f"use bias=True")


@torch.no_grad()
def _set_preserving_gates(ra: ReciprocalAttention) -> None:
    """The function-preserving gates (``w_std = 1``, ``w_rec = 0``, ``d_bias = 0``, content ``w_disc = 0``,
    ``out_gate = 0``); with :func:`_check_exact` passed, ``ra`` then computes standard attention exactly."""
    if hasattr(ra, "w_std"):
        ra.w_std.fill_(1.0)
        ra.w_rec.fill_(0.0)
    if hasattr(ra, "d_bias"):
        ra.d_bias.zero_()
    if ra.discoverability == "content":
        ra.w_disc.fill_(0.0)
    if hasattr(ra, "out_gate"):
        ra.out_gate.zero_()
    ra.invalidate_cache()


def convert_gpt2(model: nn.Module, layers: str | Iterable[int] = "all", preset: str = DEFAULT_PRESET, *,
                 seed: int = 0, **overrides: Any) -> nn.Module:
    """Replace the chosen blocks' ``attn`` with RA wrappers, in place; returns ``model``.

    ``model``: a ``GPT2LMHeadModel``, ``GPT2Model`` or any model with a ``GPT2Model`` at ``.transformer``.
    ``layers``: ``"all"`` | ``"none"`` | ``"middle"`` (middle third) | list of indices.
    ``preset``: a :data:`~reciprocal_attention.attention.PRESETS` name whose resolved configuration (after
    ``overrides``, :meth:`ReciprocalAttention.from_preset` keyword arguments such as ``rank=16``,
    ``variant='low_rank'``, ``discoverability='positional'``) has an exact function-preserving init: variants
    ``low_rank`` (default, see the module docstring for why) and ``full`` with signed gates and no routing at
    ``w_rec = 0``, plus ``standard``/``output_gate``. The gates are set to ``w_std = 1``, ``w_rec = 0``,
    ``d_bias = 0``, content ``w_disc = 0``, ``out_gate = 0``; ``W_recip`` follows the preset's init from a
    generator seeded by ``(seed, layer)``. ``n_embd``, ``n_head``, ``block_size`` (``n_positions``) and dropout
    (``attn_pdrop``/``resid_pdrop``) come from the model's config.
    """
    if _transformers_major() < 5:
        raise NotImplementedError(f"reciprocal_attention.hf targets transformers 5.x (Cache objects, attention "
                                  f"modules returning (output, weights)); installed {transformers.__version__}")
    base = _base(model)
    config = base.config
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}; got {preset!r}")
    clash = sorted(set(overrides) & set(_FROM_CONFIG))
    if clash:
        raise ValueError(f"overrides must not set {clash}: n_embd, n_head, block_size (n_positions) and dropout "
                         f"(attn_pdrop, resid_pdrop) come from the model's GPT2Config")
    bad_init = sorted(set((overrides.get("init") or {})) & set(_GATE_INIT))
    if bad_init:
        raise ValueError(f"init overrides of {bad_init} are not allowed: the conversion sets the gates to the "
                         f"function-preserving values (w_std = 1, w_rec = 0, content w_disc = 0)")
    try:
        json.dumps(overrides)
    except TypeError as e:
        raise ValueError(f"overrides must be JSON-serialisable (they are saved with the model): {e}") from None
    _check_attn_implementation(config)
    idx = layer_indices(layers, len(base.h))
    for i in idx:
        if isinstance(base.h[i].attn, GPT2ReciprocalAttention):
            raise ValueError(f"layer {i} is already converted (preset {base.h[i].attn.preset!r}); "
                             f"unconvert_gpt2 it first")
        if not isinstance(base.h[i].attn, _gpt2.GPT2Attention):
            raise TypeError(f"layer {i}: attn is a {type(base.h[i].attn).__name__}, not a GPT2Attention")
    new = {}
    for i in idx:
        old = base.h[i].attn
        ra = _build_ra(config, i, preset, overrides, seed)
        ra.to(device=old.c_attn.weight.device, dtype=old.c_attn.weight.dtype)
        with torch.no_grad():
            ra.c_attn.weight.copy_(old.c_attn.weight.t())
            ra.c_attn.bias.copy_(old.c_attn.bias)
            ra.c_proj.weight.copy_(old.c_proj.weight.t())
            ra.c_proj.bias.copy_(old.c_proj.bias)
        ra.invalidate_cache()
        wrapper = GPT2ReciprocalAttention(ra, config, i, preset, overrides)
        wrapper.train(old.training)
        new[i] = wrapper
    for i, w in new.items():  # swap only once every layer was built (no half-converted model on error)
        base.h[i].attn = w
    return model


def unconvert_gpt2(model: nn.Module) -> nn.Module:
    """Back to plain ``GPT2Attention`` in every converted block, in place; returns ``model``.

    Each layer must compute a function standard attention can (see
    :meth:`GPT2ReciprocalAttention.to_gpt2_attention`); otherwise ``ValueError`` naming the layer and parameter,
    and no layer is changed.
    """
    base = _base(model)
    new = {i: base.h[i].attn.to_gpt2_attention() for i in converted_layers(model)}
    for i, attn in new.items():
        base.h[i].attn = attn
    return model


# --------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------

def save_converted(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` (every parameter and buffer, tied ones once) and ``ra_conversion.json``.

    The JSON holds the format tag, the model class, the ``GPT2Config`` (``to_dict``), the attention
    implementation, the parameter dtype, and per converted layer the preset, the overrides and the resolved RA
    configuration; ``layers`` and ``preset`` summarise it (``preset`` is None when layers differ).
    """
    from safetensors.torch import save_model

    base = _base(model)
    cls = type(model).__name__
    if cls not in _MODEL_CLASSES:
        raise TypeError(f"save_converted supports {sorted(_MODEL_CLASSES)}; got {cls}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    per_layer = {}
    for i in converted_layers(model):
        w = base.h[i].attn
        per_layer[str(i)] = {"preset": w.preset, "overrides": w.overrides, "ra": _ra_spec(w.ra)}
    presets = {v["preset"] for v in per_layer.values()}
    overrides = [v["overrides"] for v in per_layer.values()]
    from .. import __version__

    meta = {
        "format": FORMAT,
        "model_class": cls,
        "layers": [int(i) for i in per_layer],
        "preset": presets.pop() if len(presets) == 1 else None,
        "overrides": overrides[0] if overrides and all(o == overrides[0] for o in overrides) else None,
        "per_layer": per_layer,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "gpt2_config": model.config.to_dict(),
        "transformers_version": transformers.__version__,
        "reciprocal_attention_version": __version__,
    }
    save_model(model, str(out / WEIGHTS_NAME))
    (out / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load_converted(directory: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_converted`: same class, config, conversion and exact weights.

    Returned in eval mode (as ``from_pretrained`` does), on ``device`` (default CPU), in the saved dtype.
    """
    from safetensors.torch import load_model

    src = Path(directory)
    meta_path, weights = src / META_NAME, src / WEIGHTS_NAME
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{src} must contain {META_NAME} and {WEIGHTS_NAME} (written by save_converted)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    cls = _MODEL_CLASSES.get(meta["model_class"])
    if cls is None:
        raise ValueError(f"{meta_path}: unknown model_class {meta['model_class']!r}")
    cfg_dict = dict(meta["gpt2_config"])
    config = GPT2Config.from_dict(cfg_dict)
    if meta.get("attn_implementation"):
        config._attn_implementation = meta["attn_implementation"]
    with torch.random.fork_rng(devices=[]):
        model = cls(config)
    model.to(dtype=getattr(torch, meta["dtype"]))
    for i, spec in sorted(meta["per_layer"].items(), key=lambda kv: int(kv[0])):
        convert_gpt2(model, layers=[int(i)], preset=spec["preset"], **spec["overrides"])
    load_model(model, str(weights), strict=True)
    if device is not None:
        model.to(device)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# nanoGPT-style state dict
# --------------------------------------------------------------------------------------------------------------

def _nanogpt_config_problems(cfg: GPT2Config) -> list[str]:
    """What in ``cfg`` the nanoGPT-style GPT cannot compute (config only; the tied ``lm_head`` needs the model)."""
    problems = []
    if not cfg.scale_attn_weights:
        problems.append("scale_attn_weights=False")
    if cfg.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if cfg.n_inner is not None and cfg.n_inner != 4 * cfg.hidden_size:
        problems.append(f"n_inner={cfg.n_inner} != 4*n_embd")
    if cfg.layer_norm_epsilon != 1e-5:
        problems.append(f"layer_norm_epsilon={cfg.layer_norm_epsilon} != 1e-5")
    return problems


def gpt_state_from_hf(model: nn.Module, strict: bool = True) -> dict[str, Tensor]:
    """GPT-2 weights under :class:`reciprocal_attention.model.GPT`'s (nanoGPT's) names, ``Conv1D`` transposed.

    Emitted names (``L`` blocks; every tensor a detached contiguous copy):

    * ``transformer.wte.weight`` ``[V, C]``, ``transformer.wpe.weight`` ``[n_positions, C]``
    * per block ``transformer.h.{i}.`` + ``ln_1.weight``, ``ln_1.bias``, ``attn.c_attn.weight`` ``[3C, C]``,
      ``attn.c_attn.bias`` ``[3C]``, ``attn.c_proj.weight`` ``[C, C]``, ``attn.c_proj.bias``, ``ln_2.weight``,
      ``ln_2.bias``, ``mlp.c_fc.weight`` ``[4C, C]``, ``mlp.c_fc.bias``, ``mlp.c_proj.weight`` ``[C, 4C]``,
      ``mlp.c_proj.bias`` (``nn.Linear`` layout: ``weight = conv.weight.T``)
    * a converted block emits its ``ReciprocalAttention`` state instead under ``transformer.h.{i}.attn.``
      (``c_attn.*``, ``c_proj.*`` already in Linear layout, plus ``W_recip``, ``w_std``, ``w_rec`` and, where the
      preset has them, ``w_disc``, ``d_bias``, ``u``, ``out_gate``); build that block with the same RA kwargs
    * ``transformer.ln_f.weight``, ``transformer.ln_f.bias``, ``lm_head.weight`` ``[V, C]`` (``wte`` when
      ``model`` is a bare ``GPT2Model``)

    ``strict``: raise ``ValueError`` when the config computes something the nanoGPT-style model cannot
    (``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx``, ``n_inner != 4 C``,
    ``layer_norm_epsilon != 1e-5``, untied ``lm_head``). Not checked here: the MLP activation -- build the GPT with
    ``activation=gpt_activation(model.config)`` (``"gelu_tanh"`` for GPT-2's ``gelu_new``) for the same function,
    as :func:`init_gpt_from_hf` does.
    """
    base = _base(model)
    cfg = base.config
    if strict:
        problems = _nanogpt_config_problems(cfg)
        lm = getattr(model, "lm_head", None)
        if lm is not None and lm.weight is not base.wte.weight and not torch.equal(lm.weight, base.wte.weight):
            problems.append("lm_head is not tied to wte")
        if problems:
            raise ValueError(f"the nanoGPT-style GPT cannot compute this GPT-2 config: {', '.join(problems)} "
                             f"(pass strict=False to map the weights anyway)")

    def t(x: Tensor) -> Tensor:
        return x.detach().clone().contiguous()

    out: dict[str, Tensor] = {"transformer.wte.weight": t(base.wte.weight),
                              "transformer.wpe.weight": t(base.wpe.weight)}
    for i, block in enumerate(base.h):
        p = f"transformer.h.{i}."
        out[p + "ln_1.weight"], out[p + "ln_1.bias"] = t(block.ln_1.weight), t(block.ln_1.bias)
        if isinstance(block.attn, GPT2ReciprocalAttention):
            for name, tensor in block.attn.ra.state_dict().items():
                out[p + "attn." + name] = t(tensor)
        else:
            for name in ("c_attn", "c_proj"):
                conv = getattr(block.attn, name)
                out[p + f"attn.{name}.weight"], out[p + f"attn.{name}.bias"] = t(conv.weight.t()), t(conv.bias)
        out[p + "ln_2.weight"], out[p + "ln_2.bias"] = t(block.ln_2.weight), t(block.ln_2.bias)
        for name in ("c_fc", "c_proj"):
            conv = getattr(block.mlp, name)
            out[p + f"mlp.{name}.weight"], out[p + f"mlp.{name}.bias"] = t(conv.weight.t()), t(conv.bias)
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = t(base.ln_f.weight), t(base.ln_f.bias)
    lm = getattr(model, "lm_head", None)
    out["lm_head.weight"] = t(lm.weight if lm is not None else base.wte.weight)
    return out


# --------------------------------------------------------------------------------------------------------------
# Initialising the nanoGPT-style GPT from a GPT-2 checkpoint (``ra train --init-from DIR``)
# --------------------------------------------------------------------------------------------------------------

def gpt_activation(config: GPT2Config) -> str:
    """The :class:`reciprocal_attention.model.GPTConfig` ``activation`` that computes ``config``'s MLP activation
    (``gelu_new`` / ``gelu_pytorch_tanh`` -> ``"gelu_tanh"``, ``gelu`` -> ``"gelu"``); ``ValueError`` otherwise."""
    act = config.activation_function
    if act not in GPT_ACTIVATIONS:
        raise ValueError(f"GPT-2 activation_function {act!r} has no equivalent in the nanoGPT-style GPT "
                         f"(supported: {', '.join(GPT_ACTIVATIONS)})")
    return GPT_ACTIVATIONS[act]


def _pretrained_dir(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory (expected a GPT-2 checkpoint written by save_pretrained)")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json (expected a GPT-2 checkpoint written by save_pretrained)")
    return d


def read_gpt2_config(directory: str | os.PathLike) -> GPT2Config:
    """The ``GPT2Config`` of a local ``save_pretrained`` directory (no network); clear errors if it is not one."""
    d = _pretrained_dir(directory)
    config = GPT2Config.from_pretrained(str(d), local_files_only=True)
    if getattr(config, "model_type", None) != "gpt2":
        raise ValueError(f"{d}/config.json is a {getattr(config, 'model_type', None)!r} model, not 'gpt2'")
    return config


def load_pretrained_gpt2(directory: str | os.PathLike) -> GPT2LMHeadModel:
    """``GPT2LMHeadModel.from_pretrained(directory, local_files_only=True)`` in eval mode, after checking that
    ``directory`` holds a config and weights (a missing file is a ``FileNotFoundError`` naming it)."""
    d = _pretrained_dir(directory)
    read_gpt2_config(d)
    if not any((d / name).is_file() for name in _PRETRAINED_WEIGHTS):
        raise FileNotFoundError(f"{d} has config.json but no weights (one of {', '.join(_PRETRAINED_WEIGHTS)})")
    with torch.random.fork_rng(devices=[]):  # loading must not consume the caller's RNG stream
        return GPT2LMHeadModel.from_pretrained(str(d), local_files_only=True).eval()


_TRAIN_HINT = ("; with ra train use --set model.attn=low_rank (or full, standard, output_gate), or keep this preset "
               "with --set model.attn_overrides='{\"variant\": \"low_rank\"}'")


def check_gpt_init(gpt_config: Any, config: GPT2Config) -> None:
    """Raise ``ValueError`` unless a :class:`reciprocal_attention.model.GPT` built from ``gpt_config`` can start
    at exactly the function of a GPT-2 with ``config``: same shape (``n_layer``, ``n_head``, ``n_embd``,
    ``block_size = n_positions``, ``vocab_size``), ``bias``, the matching ``activation``, and RA layers whose
    attention has an exact function-preserving init (the :func:`convert_gpt2` rule: ``low_rank``, ``full``,
    ``standard``, ``output_gate``, or another preset resolved to one of those by overrides)."""
    from ..model import build_attention

    problems = _nanogpt_config_problems(config)
    if problems:
        raise ValueError(f"the nanoGPT-style GPT cannot compute this GPT-2 config: {', '.join(problems)}")
    want = {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "block_size": config.n_positions, "vocab_size": config.vocab_size, "activation": gpt_activation(config),
            "bias": True}
    bad = [f"{k}={getattr(gpt_config, k)!r} (checkpoint: {v!r})" for k, v in want.items()
           if getattr(gpt_config, k) != v]
    if bad:
        raise ValueError(f"the GPT config does not match the GPT-2 checkpoint: {', '.join(bad)}")
    if gpt_config.ra_layer_indices():
        with torch.random.fork_rng(devices=[]):
            _check_gpt_attention(build_attention(gpt_config, use_ra=True), gpt_config)


def _check_gpt_attention(ra: ReciprocalAttention, gpt_config: Any) -> None:
    attn = gpt_config.attn
    preset = attn if isinstance(attn, str) else attn.get("preset", "custom")
    try:
        _check_exact(ra, preset)
        _check_biases(ra, preset)
    except ValueError as e:
        raise ValueError(f"cannot initialise attn={attn!r} from a GPT-2 checkpoint: {e}{_TRAIN_HINT}") from None


@torch.no_grad()
def init_gpt_from_hf(gpt: nn.Module, model: nn.Module) -> nn.Module:
    """Load a GPT-2 (``GPT2LMHeadModel``/``GPT2Model``) into the nanoGPT-style ``gpt`` so it computes exactly the
    same function; returns ``gpt``.

    ``gpt`` (a :class:`reciprocal_attention.model.GPT`) must pass :func:`check_gpt_init` for ``model.config``.
    Every shared parameter comes from :func:`gpt_state_from_hf` (``strict``); in the RA layers the gates are set
    as :func:`convert_gpt2` sets them (``w_std = 1``, ``w_rec = 0``, ...) and ``W_recip`` / ``u`` keep ``gpt``'s
    own seeded init (so RA and standard arms started from one checkpoint share every other weight).
    """
    check_gpt_init(gpt.config, _base(model).config)
    ra_layers = gpt.config.ra_layer_indices()
    for i in ra_layers:  # the actual modules (the check above built a fresh one)
        _check_gpt_attention(gpt.transformer.h[i].attn, gpt.config)
    state = gpt_state_from_hf(model, strict=True)
    own = set(gpt.state_dict())
    unexpected = sorted(set(state) - own)
    shared = set(gpt.shared_parameter_names()) | {"lm_head.weight"}
    missing = sorted((own & shared) - set(state))
    if unexpected or missing:  # pragma: no cover - shapes were checked above
        raise ValueError(f"GPT-2 state does not fit the GPT: unexpected {unexpected}, missing {missing}")
    result = gpt.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    for i in ra_layers:
        _set_preserving_gates(gpt.transformer.h[i].attn)
    for block in gpt.transformer.h:
        block.attn.invalidate_cache()
    return gpt
