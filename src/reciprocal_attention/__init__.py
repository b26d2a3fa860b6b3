"""Reciprocal Attention (RA) for GPT-2-style transformers.

RA adds to causal attention the score key j would give query i (``q_j . k_i``) besides ``q_i . k_j``, with learned
per-head gates and an optional learned per-key "discoverability" bias. The library, bottom up: ``reference`` (the
float64 math of every variant), ``fold`` (how RA runs on a standard attention kernel), ``ops`` (Triton kernels),
``functional`` / ``plan`` / ``attention`` (the functional API and the module), ``model`` (GPT-2 with RA), ``hf``
(Hugging Face GPT-2 retrofit). ``reciprocal_attention.lab`` holds the tools around it (data, training, benchmarks).
"""

from .attention import PRESETS, ReciprocalAttention
from .cache import LayerKVCache
from .attention_args import DISCOVERABILITY
from .functional import BACKENDS, reciprocal_attention
from .reference import GATES, VARIANTS, ra_attention, ra_logits

__all__ = ["BACKENDS", "DISCOVERABILITY", "GATES", "PRESETS", "VARIANTS", "LayerKVCache", "ReciprocalAttention",
           "ra_attention", "ra_logits", "reciprocal_attention"]
__version__ = "0.1.0"
