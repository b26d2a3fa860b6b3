"""Retrofit Reciprocal Attention into Hugging Face GPT-2 models.

    from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    from reciprocal_attention.hf import convert_gpt2

    model = GPT2LMHeadModel.from_pretrained("ckpt/gpt2")   # any GPT-2 you have on disk
    convert_gpt2(model, layers="all")                     # same function as before, RA terms off but trainable
    ...fine-tune (Trainer or your own loop)...
    model.save_pretrained("run/ra-gpt2")                  # config.json: model_type "gpt2-reciprocal"
    model = AutoModelForCausalLM.from_pretrained("run/ra-gpt2")   # the same RA model back

Importing this package registers ``model_type = "gpt2-reciprocal"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``. A plain ``GPT2LMHeadModel.from_pretrained`` refuses a converted checkpoint (its
``layer_types`` names ``"reciprocal_attention"`` layers, which ``GPT2Config`` rejects) instead of loading GPT-2
with fresh attention weights.

Modules: :mod:`.config` (the registered config, layer selection), :mod:`.modeling` (the attention wrapper),
:mod:`.convert` / :mod:`.unconvert` (one layer GPT-2 <-> RA, exact), :mod:`.retrofit` (:func:`convert_gpt2`,
:func:`unconvert_gpt2`: the whole model), :mod:`.auto` (the registered model classes),
:mod:`.io` (local save/load), :mod:`.nanogpt` (weights for :class:`reciprocal_attention.model.GPT`).
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "reciprocal_attention.hf needs Hugging Face transformers, an optional dependency: install it with "
        f"`pip install 'reciprocal-attention[hf]'` (import failed: {_err})") from _err

from .auto import GPT2ReciprocalLMHeadModel, GPT2ReciprocalModel
from .config import DEFAULT_PRESET, MODEL_TYPE, GPT2ReciprocalConfig, layer_indices
from .convert import CONVERTIBLE_PRESETS, converted_layers
from .io import (load_converted, load_pretrained, load_pretrained_gpt2, read_config, read_gpt2_config,
                 save_converted)
from .modeling import GPT2ReciprocalAttention
from .nanogpt import GPT_ACTIVATIONS, check_gpt_init, gpt_activation, gpt_state_from_hf, init_gpt_from_hf
from .retrofit import convert_gpt2, unconvert_gpt2

__all__ = ["CONVERTIBLE_PRESETS", "DEFAULT_PRESET", "GPT2ReciprocalAttention", "GPT2ReciprocalConfig",
           "GPT2ReciprocalLMHeadModel", "GPT2ReciprocalModel", "GPT_ACTIVATIONS", "MODEL_TYPE", "check_gpt_init",
           "convert_gpt2", "converted_layers", "gpt_activation", "gpt_state_from_hf", "init_gpt_from_hf",
           "layer_indices", "load_converted", "load_pretrained", "load_pretrained_gpt2", "read_config",
           "read_gpt2_config", "save_converted", "unconvert_gpt2"]
