"""The bridge to the project's nanoGPT-style :class:`reciprocal_attention.model.GPT`: GPT-2 weights under its
names (:func:`gpt_state_from_hf`) and a GPT started at a GPT-2 checkpoint's exact function
(:func:`init_gpt_from_hf`, ``ra train --init-from DIR``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from transformers import GPT2Config

from ..attention import ReciprocalAttention
from .convert import base_model, check_biases, check_exact, set_preserving_gates
from .modeling import GPT2ReciprocalAttention

#: GPT-2 ``activation_function`` -> the :class:`reciprocal_attention.model.GPTConfig` ``activation`` computing it.
GPT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


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
    base = base_model(model)
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


def gpt_activation(config: GPT2Config) -> str:
    """The :class:`reciprocal_attention.model.GPTConfig` ``activation`` that computes ``config``'s MLP activation
    (``gelu_new`` / ``gelu_pytorch_tanh`` -> ``"gelu_tanh"``, ``gelu`` -> ``"gelu"``); ``ValueError`` otherwise."""
    act = config.activation_function
    if act not in GPT_ACTIVATIONS:
        raise ValueError(f"GPT-2 activation_function {act!r} has no equivalent in the nanoGPT-style GPT "
                         f"(supported: {', '.join(GPT_ACTIVATIONS)})")
    return GPT_ACTIVATIONS[act]


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
        check_exact(ra, preset)
        check_biases(ra, preset)
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
    check_gpt_init(gpt.config, base_model(model).config)
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
        set_preserving_gates(gpt.transformer.h[i].attn)
    for block in gpt.transformer.h:
        block.attn.invalidate_cache()
    return gpt
