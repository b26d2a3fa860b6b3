"""The attention layer of a converted GPT-2 block: :class:`GPT2ReciprocalAttention`.

It has ``GPT2Attention``'s forward signature (transformers 5.x: ``hidden_states, cache, attention_mask,
encoder_hidden_states, encoder_attention_mask, output_attentions, **kwargs``; the older keyword names
``past_key_values``/``past_key_value``/``layer_past`` are accepted too) and returns ``(attn_output, attn_weights)``.
The math is the wrapped :class:`~reciprocal_attention.attention.ReciprocalAttention`'s own:
``ra.project_heads`` gives ``Q~, K~, V`` whose plain softmax attention is RA (the reciprocal term folded into the
width, a discoverability bias in one extra Q/K feature at GPT-2's ``position_ids``), and ``ra.project_out`` the
output. So the per-key state is just ``(K~, V)``, stored through ``cache.update(K~, V, layer_idx)`` of any
transformers ``Cache`` that grows dynamically (``DynamicCache``, the default of ``generate``). Attention runs
through PyTorch SDPA with transformers' own mask: ``None`` (causal, bottom-right aligned with a cache) or a 4-D
boolean / additive float mask, which carries left padding. GPT-2's ``scale_attn_weights``,
``scale_attn_by_inverse_layer_idx`` and (eager only, as in transformers) ``reorder_and_upcast_attn`` are honoured.

Not supported (a clear error, never a different function): attention implementations other than
``"sdpa"``/``"eager"`` (flash-attention masks are 2-D, flex masks are ``BlockMask``), ``head_mask``, legacy tuple
caches, caches that preallocate ``head_dim`` (static) when the folded width differs from ``D``.
``output_attentions=True`` under ``"eager"`` reports the converted layers' probabilities too (the wrapper appends
them to transformers' active output collector, a private API it degrades gracefully without); under ``"sdpa"`` no
layer reports weights, converted or not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import GPT2Config
from transformers.cache_utils import Cache

from ..attention import ReciprocalAttention

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

_CACHE_ALIASES = ("past_key_values", "past_key_value", "layer_past")


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


def gpt2_scaling(config: GPT2Config, layer_idx: int, head_dim: int) -> float:
    """The logit scale ``GPT2Attention`` uses for layer ``layer_idx`` (same expression, same rounding)."""
    scaling = 1.0
    if config.scale_attn_weights:
        scaling = head_dim ** -0.5
    if config.scale_attn_by_inverse_layer_idx:
        scaling /= float(layer_idx + 1)
    return scaling


def sdpa_mask(attention_mask: Any, Tq: int, Tk: int, device: torch.device) -> tuple[Tensor | None, bool]:
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


class CallState:
    """What the caller of the ``GPT2Model`` holding converted layers passed, for the current call.

    ``causal_only``: no ``attention_mask``, cache, ``position_ids`` or encoder states came in, so the mask
    transformers builds is exactly the causal one. Under torch.compile transformers materialises that mask (with
    torch < 2.14 it cannot tell tracing from export), which sends SDPA to a masked kernel; at the converted width
    ``D + R`` (72 for GPT-2 small) that kernel runs at head dim 128, 2x the cost of the baseline's at 64. Knowing
    the call is causal-only, the layers use ``is_causal`` instead (the flash kernel), exactly the same function.
    """

    __slots__ = ("causal_only",)

    def __init__(self) -> None:
        self.causal_only = False


_CALL_INPUTS = ("attention_mask", "cache", "past_key_values", "position_ids", "encoder_hidden_states")


def _note_call(base: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of the ``GPT2Model``: records :attr:`CallState.causal_only` for this call (positional
    arguments past ``input_ids`` count as "not causal-only": the safe answer)."""
    base._ra_call_state.causal_only = len(args) <= 1 and all(kwargs.get(k) is None for k in _CALL_INPUTS)


def attach_call_state(base: nn.Module) -> None:
    """Give ``base`` (a ``GPT2Model``) a :class:`CallState` filled by a forward pre-hook and share it with its
    converted layers; removed again when no layer is converted."""
    layers = [blk.attn for blk in base.h if isinstance(blk.attn, GPT2ReciprocalAttention)]
    handle = getattr(base, "_ra_call_hook", None)
    if not layers:
        if handle is not None:
            handle.remove()
            del base._ra_call_hook, base._ra_call_state
        return
    if handle is None:
        base._ra_call_state = CallState()
        base._ra_call_hook = base.register_forward_pre_hook(_note_call, with_kwargs=True)
    for layer in layers:
        layer.call_state = base._ra_call_state


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
        self.scaling = gpt2_scaling(config, layer_idx, ra.head_dim)
        self.call_state: CallState | None = None  # set by attach_call_state when the layer is in a GPT2Model

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, preset={self.preset!r}, scaling={self.scaling:.6g}"

    def _positions(self, x: Tensor, position_ids: Tensor | None, cache: Cache | None) -> Tensor | None:
        """Absolute positions ``[T]`` or ``[B, T]`` for positional discoverability (None when the layer has none).

        transformers' GPT2Model always passes ``position_ids`` (they carry left padding); the cache length is
        read only for a direct call without them, so a compiled forward does not specialise on it.
        """
        if self.ra.discoverability != "positional":
            return None
        T = x.shape[1]
        if position_ids is None:
            offset = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            pos = torch.arange(offset, offset + T, device=x.device).unsqueeze(0)
        else:
            pos = position_ids.reshape(-1, T).to(x.device)
        if not torch.compiler.is_compiling():  # eager only: under compile the ints would be guarded per token
            hi, lo = int(pos.max()), int(pos.min())
            if hi >= self.ra.block_size or lo < 0:
                raise ValueError(f"positional discoverability covers positions [0, {self.ra.block_size}) "
                                 f"(n_positions); got positions in [{lo}, {hi}]")
        return pos[0] if pos.shape[0] == 1 else pos  # [T] when every row has the same positions

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
        cache = self._resolve_cache(cache, kwargs)
        if encoder_hidden_states is not None:
            raise ValueError("GPT2ReciprocalAttention is a self-attention layer; cross-attention stays in the "
                             "block's (unconverted) `crossattention` module")
        if kwargs.pop("head_mask", None) is not None:
            raise NotImplementedError("head_mask is not supported by converted GPT-2 layers")
        ra = self.ra
        positions = self._positions(hidden_states, kwargs.get("position_ids"), cache)
        q, k, v = ra.project_heads(hidden_states, positions, scale=self.scaling)
        if cache is not None:
            self._check_cache_layer(cache, k)
            k, v = cache.update(k, v, self.layer_idx)

        state = self.call_state
        if state is not None and state.causal_only and q.shape[2] == k.shape[2]:
            mask, causal = None, True  # transformers' mask is the causal one (see CallState)
        else:
            mask, causal = sdpa_mask(attention_mask, q.shape[2], k.shape[2], q.device)
        dropout_p = ra.dropout if self.training else 0.0
        eager = getattr(self.config, "_attn_implementation", "eager") == "eager"
        upcast = eager and bool(getattr(self.config, "reorder_and_upcast_attn", False))
        record = _attention_recorder() if eager else None  # sdpa GPT2Attention layers record nothing either
        output_attentions = bool(output_attentions) or record is not None
        weights = None
        if output_attentions or upcast:
            y, weights = self._explicit_attention(q, k, v, mask, causal, dropout_p, upcast)
        else:
            if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
                # SDPA wants the query's dtype; clamp so an fp32 "min" mask does not round to -inf (NaN rows)
                mask = mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
            # V is zero-padded to the Q/K width only where SDPA can then use its flash kernels (no mask, several
            # queries: training, prefill); masked or single-query calls (decoding) take V as it is, which saves
            # a copy of the whole cached V and of the output per token
            pad = v.shape[-1] != q.shape[-1] and mask is None and q.shape[2] > 1
            vp = F.pad(v, (0, q.shape[-1] - v.shape[-1])) if pad else v
            y = F.scaled_dot_product_attention(q, k, vp, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                               scale=self.scaling)
            y = y[..., :v.shape[-1]] if pad else y
        if record is not None:
            record.append(weights)
        return ra.project_out(y), (weights if output_attentions else None)

    @staticmethod
    def _resolve_cache(cache: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
        """The self-attention ``Cache`` from ``cache`` or its older keyword names; errors for other kinds."""
        for alias in _CACHE_ALIASES:
            val = kwargs.pop(alias, None)
            if val is not None:
                if cache is not None and val is not cache:
                    raise ValueError(f"got both cache and {alias}; pass one")
                cache = val
        if cache is not None and not isinstance(cache, Cache):
            raise NotImplementedError(f"converted GPT-2 layers need a transformers Cache object (DynamicCache); "
                                      f"got {type(cache).__name__} (legacy tuple caches are not supported)")
        if _EncoderDecoderCache is not None and isinstance(cache, _EncoderDecoderCache):
            cache = cache.self_attention_cache
        return cache

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
