"""The registered config of a GPT-2 with Reciprocal Attention: ``model_type = "gpt2-reciprocal"``.

:class:`GPT2ReciprocalConfig` is a ``GPT2Config`` that also records the conversion (which layers, which
:data:`~reciprocal_attention.attention.PRESETS` preset, which overrides), so ``save_pretrained`` writes it into
``config.json`` and ``from_pretrained`` rebuilds the same RA layers before loading the weights.

``config.json`` also carries ``layer_types``, ``"reciprocal_attention"`` for each converted layer: transformers'
own config validation refuses that unknown layer type, so a plain ``GPT2LMHeadModel.from_pretrained`` of a
converted checkpoint fails loudly instead of dropping the RA weights and running fresh standard attention. In
memory the config has no ``layer_types`` attribute, so transformers' caches and masks treat every layer as GPT-2's
full attention (a converted layer caches its folded keys in the same dynamic cache layer).
"""

from __future__ import annotations

import operator
from typing import Any, Iterable

import numpy as np
import torch
from huggingface_hub.dataclasses import strict
from transformers import GPT2Config

MODEL_TYPE = "gpt2-reciprocal"
RA_LAYER_TYPE = "reciprocal_attention"
STANDARD_LAYER_TYPE = "full_attention"
DEFAULT_PRESET = "low_rank"
_LAYERS_HELP = "'all', 'none', 'middle' or a sequence of integer layer indices"


def _as_index(i: Any) -> int:
    """``i`` as a Python int: ints, numpy integers and integer 0-d tensors; bools and floats are refused."""
    if isinstance(i, (bool, np.bool_)) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool):
        raise TypeError("bool")
    return operator.index(i)


def layer_indices(layers: str | Iterable[int], n_layer: int) -> list[int]:
    """Resolve ``layers``: ``"all"``, ``"none"``, ``"middle"`` (the middle third; every layer when fewer than 3,
    as :meth:`reciprocal_attention.model.GPTConfig.ra_layer_indices`) or distinct indices in ``[0, n_layer)``
    given as any sequence of integers (list, tuple, range, numpy array, integer torch tensor)."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n_layer))
        if layers == "none":
            return []
        if layers == "middle":
            return list(range(n_layer // 3, n_layer - n_layer // 3)) if n_layer >= 3 else list(range(n_layer))
        raise ValueError(f"layers must be {_LAYERS_HELP}; got {layers!r}")
    if getattr(layers, "ndim", 1) != 1:  # numpy arrays and tensors: one dimension
        raise ValueError(f"layers must be {_LAYERS_HELP} (one dimension); got shape "
                         f"{tuple(getattr(layers, 'shape', ()))}")
    try:
        sel = [_as_index(i) for i in layers]
    except TypeError:
        raise ValueError(f"layers must be {_LAYERS_HELP}; got {layers!r}") from None
    bad = [i for i in sel if not 0 <= i < n_layer]
    if bad or len(set(sel)) != len(sel):
        raise ValueError(f"layer indices must be distinct and in [0, {n_layer}) for this {n_layer}-layer model; "
                         f"got {sel}")
    return sorted(sel)


@strict
class GPT2ReciprocalConfig(GPT2Config):
    """``GPT2Config`` plus the RA conversion; build a model from it with ``GPT2ReciprocalLMHeadModel(config)``.

    ``ra_layers`` (``"all"``, ``"none"``, ``"middle"`` or indices), ``ra_preset`` and ``ra_overrides``
    (:meth:`ReciprocalAttention.from_preset` keyword arguments) describe a uniform conversion; ``ra_per_layer``
    (``{"3": {"preset": ..., "overrides": {...}}, ...}``), when given, is the exact per-layer record and wins.
    After construction all four agree: ``ra_layers`` is the sorted index list, ``ra_preset`` / ``ra_overrides``
    are the common values (``None`` where layers differ). ``ra_seed`` seeds ``W_recip``'s init per layer.
    """

    model_type = MODEL_TYPE

    ra_layers: list[int] | str = "all"
    ra_preset: str | None = DEFAULT_PRESET
    ra_overrides: dict | None = None
    ra_per_layer: dict | None = None
    ra_seed: int = 0

    def __post_init__(self, **kwargs: Any) -> None:
        saved_types = kwargs.pop("layer_types", None)  # written by to_dict for loaders; derived, never stored
        per_layer = self.ra_per_layer
        if per_layer is None:
            idx = layer_indices(self.ra_layers, self.n_layer)
            if idx and not isinstance(self.ra_preset, str):
                raise ValueError(f"ra_preset must be a preset name when ra_layers selects layers; got "
                                 f"{self.ra_preset!r}")
            per_layer = {str(i): {"preset": self.ra_preset, "overrides": dict(self.ra_overrides or {})}
                         for i in idx}
        self.set_conversion(per_layer)
        if saved_types is not None and list(saved_types) != self.ra_layer_types():
            raise ValueError(f"layer_types {saved_types} disagrees with the conversion ra_per_layer={per_layer} "
                             f"(expected {self.ra_layer_types()})")
        super().__post_init__(**kwargs)

    def set_conversion(self, per_layer: dict[str, dict[str, Any]]) -> None:
        """Record ``per_layer`` (``{layer: {"preset": str, "overrides": dict}}``) and the summaries derived from it."""
        clean: dict[str, dict[str, Any]] = {}
        for key, spec in per_layer.items():
            i = int(key)
            if not 0 <= i < self.n_layer:
                raise ValueError(f"ra_per_layer: layer {key!r} is outside [0, {self.n_layer})")
            if not isinstance(spec, dict) or not isinstance(spec.get("preset"), str) \
                    or not isinstance(spec.get("overrides", {}), dict):
                raise ValueError(f"ra_per_layer[{key!r}] must be {{'preset': str, 'overrides': dict}}; got {spec!r}")
            clean[str(i)] = {"preset": spec["preset"], "overrides": dict(spec.get("overrides", {}))}
        layers = sorted(int(k) for k in clean)
        specs = [clean[str(i)] for i in layers]
        presets = {s["preset"] for s in specs}
        same_overrides = all(s["overrides"] == specs[0]["overrides"] for s in specs)
        self.ra_per_layer = {str(i): clean[str(i)] for i in layers}
        self.ra_layers = layers
        self.ra_preset = presets.pop() if len(presets) == 1 else None
        self.ra_overrides = dict(specs[0]["overrides"]) if specs and same_overrides else None

    def ra_layer_types(self) -> list[str]:
        """``"reciprocal_attention"`` or ``"full_attention"`` per layer (the ``layer_types`` of ``config.json``)."""
        layers = set(self.ra_layers)
        return [RA_LAYER_TYPE if i in layers else STANDARD_LAYER_TYPE for i in range(self.n_layer)]

    def to_dict(self) -> dict[str, Any]:
        """``GPT2Config.to_dict`` plus ``layer_types``."""
        return {**super().to_dict(), "layer_types": self.ra_layer_types()}

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``save_pretrained`` writes: the non-default fields plus, always, the conversion and ``layer_types``."""
        return {**super().to_diff_dict(), "ra_per_layer": self.ra_per_layer, "ra_seed": self.ra_seed,
                "layer_types": self.ra_layer_types()}

    def conversion(self) -> dict[int, tuple[str, dict[str, Any]]]:
        """``{layer: (preset, overrides)}`` of every converted layer."""
        return {int(k): (v["preset"], dict(v["overrides"])) for k, v in (self.ra_per_layer or {}).items()}


_RA_FIELDS = ("ra_layers", "ra_preset", "ra_overrides", "ra_per_layer", "ra_seed")


def make_reciprocal(config: GPT2Config, per_layer: dict[str, dict[str, Any]], seed: int) -> GPT2ReciprocalConfig:
    """Turn ``config`` (in place, so every module holding it sees the change) into a :class:`GPT2ReciprocalConfig`
    recording ``per_layer``; returns it."""
    if not isinstance(config, GPT2ReciprocalConfig):
        config.__class__ = GPT2ReciprocalConfig
        config.ra_seed = int(seed)
    config.set_conversion(per_layer)
    return config


def make_plain(config: GPT2Config) -> GPT2Config:
    """Turn a :class:`GPT2ReciprocalConfig` with no converted layer back into a plain ``GPT2Config``, in place."""
    if isinstance(config, GPT2ReciprocalConfig):
        for name in _RA_FIELDS:
            config.__dict__.pop(name, None)
        config.__class__ = GPT2Config
    return config
