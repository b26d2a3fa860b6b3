"""Reciprocal Attention (RA) for GPT-2-style transformers.

RA adds to causal attention the score key j would give query i (``q_j . k_i``) besides ``q_i . k_j``, with learned
per-head gates and an optional learned per-key "discoverability" bias. See ``reference`` for the exact math,
``fold`` for how it runs on a standard attention kernel, ``attention`` for the module.
"""

from .attention import BACKENDS, PRESETS, LayerKVCache, ReciprocalAttention, reciprocal_attention
from .reference import GATES, VARIANTS, ra_attention, ra_logits

__all__ = ["BACKENDS", "GATES", "PRESETS", "VARIANTS", "LayerKVCache", "ReciprocalAttention", "ra_attention",
           "ra_logits", "reciprocal_attention"]
__version__ = "0.1.0"
