"""The model-level conversions users call: :func:`convert_gpt2` (GPT-2 -> RA) and :func:`unconvert_gpt2` (back).

Each swaps the chosen layers (:mod:`.convert`, :mod:`.unconvert`), shares the call state of the model with its
converted layers, and records the conversion in the model's class and config (:mod:`.auto`), so
``save_pretrained`` / ``from_pretrained`` round-trip.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch.nn as nn
from transformers import GPT2Model

from .auto import plain_class, reciprocal_class
from .config import DEFAULT_PRESET, GPT2ReciprocalConfig, layer_indices, make_plain, make_reciprocal
from .convert import _check_request, base_model, convert_layers, converted_layers
from .modeling import attach_call_state
from .unconvert import gpt2_attention_from

log = logging.getLogger(__name__)

__all__ = ["convert_gpt2", "unconvert_gpt2", "record_conversion"]


def record_conversion(model: nn.Module, base: GPT2Model, seed: int) -> None:
    """Make ``model`` (and its config) the registered RA classes so ``save_pretrained`` round-trips, or plain
    GPT-2 again when no layer is converted."""
    per_layer = {str(i): {"preset": base.h[i].attn.preset, "overrides": base.h[i].attn.overrides}
                 for i in converted_layers(base)}
    if not per_layer:
        if isinstance(base.config, GPT2ReciprocalConfig):
            make_plain(base.config)
            model.__class__ = plain_class(type(model))
        return
    target = reciprocal_class(type(model))
    if target is None:
        log.warning("convert_gpt2: %s has no registered RA class; model.save_pretrained will not record the "
                    "conversion (use save_converted on a GPT2LMHeadModel / GPT2Model)", type(model).__name__)
        return
    make_reciprocal(base.config, per_layer, seed)
    model.__class__ = target


def convert_gpt2(model: nn.Module, layers: str | Iterable[int] = "all", preset: str = DEFAULT_PRESET, *,
                 seed: int = 0, **overrides: Any) -> nn.Module:
    """Replace the chosen blocks' ``attn`` with RA wrappers, in place; returns ``model``.

    ``model``: a ``GPT2LMHeadModel``, ``GPT2Model`` or any model with a ``GPT2Model`` at ``.transformer``; a
    ``GPT2LMHeadModel`` / ``GPT2Model`` becomes a :class:`~reciprocal_attention.hf.GPT2ReciprocalLMHeadModel` /
    ``GPT2ReciprocalModel`` whose config records the conversion, so ``save_pretrained`` / ``from_pretrained``
    round-trip. ``layers``: ``"all"`` | ``"none"`` | ``"middle"`` (middle third) | any sequence of integer
    indices (list, range, numpy array, integer tensor).
    ``preset``: a :data:`~reciprocal_attention.attention.PRESETS` name whose resolved configuration (after
    ``overrides``, :meth:`ReciprocalAttention.from_preset` keyword arguments such as ``rank=16``,
    ``variant='low_rank'``, ``discoverability='positional'``) has an exact function-preserving init: variants
    ``low_rank`` (default, see the module docstring for why) and ``full`` with signed gates and no routing at
    ``w_rec = 0``, plus ``standard``/``output_gate``. The gates are set to ``w_std = 1``, ``w_rec = 0``,
    ``d_bias = 0``, content ``w_disc = 0``, ``out_gate = 0``; ``W_recip`` follows the preset's init from a
    generator seeded by ``(seed, layer)``. ``n_embd``, ``n_head``, ``block_size`` (``n_positions``) and dropout
    (``attn_pdrop``/``resid_pdrop``) come from the model's config.
    """
    _check_request(preset, overrides)
    base = base_model(model)
    idx = layer_indices(layers, len(base.h))
    convert_layers(base, {i: (preset, dict(overrides)) for i in idx}, seed)
    record_conversion(model, base, getattr(base.config, "ra_seed", seed))
    return model


def unconvert_gpt2(model: nn.Module) -> nn.Module:
    """Back to plain ``GPT2Attention`` in every converted block, in place; returns ``model`` (a plain
    ``GPT2LMHeadModel`` / ``GPT2Model`` with a plain ``GPT2Config`` again once no layer is converted).

    Each layer must compute a function standard attention can (see :func:`gpt2_attention_from`); otherwise
    ``ValueError`` naming the layer and parameter, and no layer is changed.
    """
    base = base_model(model)
    new = {i: gpt2_attention_from(base.h[i].attn) for i in converted_layers(model)}
    for i, attn in new.items():
        base.h[i].attn = attn
    attach_call_state(base)
    record_conversion(model, base, 0)
    return model
