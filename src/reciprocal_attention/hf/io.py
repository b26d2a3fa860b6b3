"""Saving and loading GPT-2 checkpoints, plain or converted, from local directories (never the network).

A converted model is saved the transformers way: ``model.save_pretrained(d)`` writes ``config.json`` with
``model_type = "gpt2-reciprocal"`` and the conversion, and ``model.safetensors``; ``from_pretrained`` of
:class:`~reciprocal_attention.hf.GPT2ReciprocalLMHeadModel` or ``AutoModelForCausalLM`` rebuilds it.
:func:`save_converted` / :func:`load_converted` are thin aliases of those two.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from .config import MODEL_TYPE, GPT2ReciprocalConfig
from .convert import converted_layers

#: Weight files ``save_pretrained`` writes (single file or sharded index).
PRETRAINED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


def save_converted(model: nn.Module, directory: str | os.PathLike) -> Path:
    """``model.save_pretrained(directory)`` for a converted ``GPT2LMHeadModel`` / ``GPT2Model``; returns the path.

    ``TypeError`` for a model whose class does not record the conversion (convert it with :func:`convert_gpt2`).
    """
    if not isinstance(getattr(model, "config", None), GPT2ReciprocalConfig) or not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_converted needs a model converted by convert_gpt2 (a GPT2ReciprocalLMHeadModel or "
                        f"GPT2ReciprocalModel); got {type(model).__name__}")
    out = Path(directory)
    model.save_pretrained(out)
    return out


def _pretrained_dir(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory (expected a GPT-2 checkpoint written by save_pretrained)")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json (expected a GPT-2 checkpoint written by save_pretrained)")
    if not any((d / name).is_file() for name in PRETRAINED_WEIGHTS):
        raise FileNotFoundError(f"{d} has config.json but no weights (one of {', '.join(PRETRAINED_WEIGHTS)})")
    return d


def read_config(directory: str | os.PathLike) -> GPT2Config:
    """The config of a local ``save_pretrained`` directory: a ``GPT2Config`` or :class:`GPT2ReciprocalConfig`;
    ``FileNotFoundError`` / ``ValueError`` naming the problem otherwise."""
    d = Path(directory)
    if not d.is_dir() or not (d / "config.json").is_file():
        _pretrained_dir(d)  # raises the specific error
    config = AutoConfig.from_pretrained(str(d), local_files_only=True)
    if not isinstance(config, GPT2Config):
        raise ValueError(f"{d}/config.json is a {getattr(config, 'model_type', None)!r} model, not 'gpt2' or "
                         f"{MODEL_TYPE!r}")
    return config


def read_gpt2_config(directory: str | os.PathLike) -> GPT2Config:
    """The ``GPT2Config`` of a local plain GPT-2 ``save_pretrained`` directory; ``ValueError`` for a converted one."""
    config = read_config(directory)
    if isinstance(config, GPT2ReciprocalConfig):
        raise ValueError(f"{directory}/config.json is a converted {MODEL_TYPE!r} model; a plain 'gpt2' checkpoint "
                         f"is needed here")
    return config


def load_pretrained(directory: str | os.PathLike, device: str | torch.device | None = None) -> GPT2LMHeadModel:
    """A GPT-2 from a local directory, plain or converted (then as the same RA model), in eval mode, in its saved
    dtype, on ``device`` (default CPU): a language model, or a bare ``GPT2Model`` where that was saved."""
    d = _pretrained_dir(directory)
    config = read_config(d)
    bare = (config.architectures or [""])[0] in ("GPT2Model", "GPT2ReciprocalModel")
    with torch.random.fork_rng(devices=[]):  # loading must not consume the caller's RNG stream
        model = (AutoModel if bare else AutoModelForCausalLM).from_pretrained(str(d), local_files_only=True,
                                                                               dtype="auto")
    if device is not None:
        model.to(device)
    return model.eval()


def load_pretrained_gpt2(directory: str | os.PathLike) -> GPT2LMHeadModel:
    """A plain ``GPT2LMHeadModel`` from a local directory in eval mode (``ValueError`` for a converted one)."""
    d = _pretrained_dir(directory)
    read_gpt2_config(d)
    return load_pretrained(d)


def load_converted(directory: str | os.PathLike, device: str | torch.device | None = None) -> GPT2LMHeadModel:
    """A converted model saved by :func:`save_converted` / ``save_pretrained``: same class, config, conversion and
    exact weights, in eval mode, in the saved dtype, on ``device`` (default CPU)."""
    d = _pretrained_dir(directory)
    if not isinstance(read_config(d), GPT2ReciprocalConfig):
        raise ValueError(f"{d}/config.json is a plain GPT-2 (model_type 'gpt2'), not a converted {MODEL_TYPE!r} "
                         f"model; load it with load_pretrained")
    model = load_pretrained(d, device)
    if converted_layers(model) != model.config.ra_layers:  # pragma: no cover - the class builds them
        raise RuntimeError(f"{d}: from_pretrained rebuilt RA layers {converted_layers(model)}, the config records "
                           f"{model.config.ra_layers}")
    return model
