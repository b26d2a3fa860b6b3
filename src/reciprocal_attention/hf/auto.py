"""The registered model classes of ``model_type = "gpt2-reciprocal"``.

:class:`GPT2ReciprocalLMHeadModel` / :class:`GPT2ReciprocalModel` are ``GPT2LMHeadModel`` / ``GPT2Model`` whose
``__init__`` converts the layers its :class:`~reciprocal_attention.hf.config.GPT2ReciprocalConfig` names, so
``from_pretrained`` builds the RA layers before it loads their weights. Importing this module registers them with
``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2LMHeadModel, GPT2Model

from .config import MODEL_TYPE, GPT2ReciprocalConfig
from .convert import base_model, convert_layers


def _build_layers(model: GPT2Model | GPT2LMHeadModel, config: GPT2ReciprocalConfig) -> None:
    convert_layers(base_model(model), config.conversion(), config.ra_seed)


class GPT2ReciprocalModel(GPT2Model):
    """``GPT2Model`` with the RA layers its config records (``config.ra_per_layer``)."""

    config_class = GPT2ReciprocalConfig

    def __init__(self, config: GPT2ReciprocalConfig) -> None:
        super().__init__(config)
        _build_layers(self, config)


class GPT2ReciprocalLMHeadModel(GPT2LMHeadModel):
    """``GPT2LMHeadModel`` with the RA layers its config records (``config.ra_per_layer``).

    ``save_pretrained`` writes ``model_type = "gpt2-reciprocal"`` and the conversion into ``config.json``;
    ``GPT2ReciprocalLMHeadModel.from_pretrained(d)`` and (after ``import reciprocal_attention.hf``)
    ``AutoModelForCausalLM.from_pretrained(d)`` load it back as the same RA model, Trainer checkpoints included.
    """

    config_class = GPT2ReciprocalConfig

    def __init__(self, config: GPT2ReciprocalConfig) -> None:
        super().__init__(config)
        _build_layers(self, config)


_RECIPROCAL = {GPT2LMHeadModel: GPT2ReciprocalLMHeadModel, GPT2Model: GPT2ReciprocalModel}
_PLAIN = {v: k for k, v in _RECIPROCAL.items()}


def reciprocal_class(cls: type) -> type | None:
    """The RA class a converted ``cls`` becomes (``cls`` itself if it already is one); None for other classes."""
    return cls if cls in _PLAIN else _RECIPROCAL.get(cls)


def plain_class(cls: type) -> type:
    """The plain transformers class of an RA class (other classes unchanged)."""
    return _PLAIN.get(cls, cls)


AutoConfig.register(MODEL_TYPE, GPT2ReciprocalConfig, exist_ok=True)
AutoModel.register(GPT2ReciprocalConfig, GPT2ReciprocalModel, exist_ok=True)
AutoModelForCausalLM.register(GPT2ReciprocalConfig, GPT2ReciprocalLMHeadModel, exist_ok=True)
