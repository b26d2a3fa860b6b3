"""Convert the layers of a Hugging Face GPT-2 to Reciprocal Attention in place, exactly (the model-level calls are
in :mod:`.retrofit`).

Why ``low_rank`` is the default conversion preset: RA must start *exactly* at the pretrained function and still be
able to move away from it. The logit of ``low_rank`` is ``scale * (a q_i.k_j + b (k_i W).(q_j W))`` over width
``D + R``: with ``a = w_std = 1`` and ``b = w_rec = 0`` it is the standard logit over all ``D`` features, and with
signed gates (``w_rec`` on the Q side only) ``d logit / d w_rec = scale * (k_i W).(q_j W)``, which is non-zero
because ``W_recip`` starts orthogonal, so RA switches on from the first optimizer step. ``full`` (``S + S^T``) has
the same property but doubles the QK work; ``low_rank`` adds only ``R/D`` (8/64 = 12.5% for GPT-2 small). The
``same_flop`` presets (``ra``, ``ra_disc``, ``seed``) cannot start exactly: their standard term sees only
``D - R`` features, and the only exact setting (head routing) is absorbing, so RA would never turn on. Those
presets raise a ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn as nn
import transformers
from transformers import GPT2Config, GPT2Model
from transformers.models.gpt2 import modeling_gpt2 as _gpt2

from ..attention import PRESETS, ReciprocalAttention
from .modeling import GPT2ReciprocalAttention, attach_call_state

#: Module presets with an exact, trainable function-preserving init (``ra_disc`` only with ``variant=`` low_rank
#: or full; the check is on the resolved configuration, so overrides decide).
CONVERTIBLE_PRESETS = ("low_rank", "full", "standard", "output_gate")
_GATE_INIT = ("w_std", "w_rec", "w_disc")
_FROM_CONFIG = ("n_embd", "n_head", "block_size", "dropout")


def base_model(model: nn.Module) -> GPT2Model:
    """The ``GPT2Model`` inside ``model`` (``model`` itself or ``model.transformer``)."""
    base = model if isinstance(model, GPT2Model) else getattr(model, "transformer", None)
    if not isinstance(base, GPT2Model):
        raise TypeError(f"expected a transformers GPT2Model or a model with a GPT2Model at .transformer "
                        f"(GPT2LMHeadModel, ...); got {type(model).__name__}")
    return base


def converted_layers(model: nn.Module) -> list[int]:
    """Indices of the blocks whose ``attn`` is a :class:`GPT2ReciprocalAttention`."""
    return [i for i, b in enumerate(base_model(model).h) if isinstance(b.attn, GPT2ReciprocalAttention)]


def _layer_seed(seed: int, layer: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:hf.h.{layer}.attn".encode()).digest()[:8], "little") >> 1


def check_attn_implementation(config: GPT2Config) -> None:
    """Raise unless ``config`` runs attention as ``"sdpa"`` or ``"eager"`` (the masks the wrapper takes)."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise NotImplementedError(
            f"converted GPT-2 layers support attn_implementation 'sdpa' or 'eager'; this model uses {impl!r} "
            f"(its masks are 2-D or BlockMask). Build/load it with attn_implementation='sdpa', or call "
            f"model.set_attn_implementation('sdpa') first")


def check_exact(ra: ReciprocalAttention, preset: str) -> None:
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


def check_biases(ra: ReciprocalAttention, preset: str) -> None:
    """Raise unless ``ra`` has ``c_attn``/``c_proj`` biases to hold GPT-2's."""
    if ra.c_attn.bias is None or ra.c_proj.bias is None:
        raise ValueError(f"preset {preset!r} with bias=False cannot hold GPT-2's c_attn/c_proj biases; "
                         f"use bias=True")


@torch.no_grad()
def set_preserving_gates(ra: ReciprocalAttention) -> None:
    """The function-preserving gates (``w_std = 1``, ``w_rec = 0``, ``d_bias = 0``, content ``w_disc = 0``,
    ``out_gate = 0``); with :func:`check_exact` passed, ``ra`` then computes standard attention exactly."""
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


def _build_ra(config: GPT2Config, layer: int, preset: str, overrides: dict[str, Any], seed: int
              ) -> ReciprocalAttention:
    C, H = config.hidden_size, config.num_attention_heads
    with torch.random.fork_rng(devices=[]):  # conversion must not consume the caller's RNG stream
        ra = ReciprocalAttention.from_preset(preset, n_embd=C, n_head=H, block_size=config.n_positions,
                                             dropout=float(config.attn_pdrop), **overrides)
    ra.resid_dropout = nn.Dropout(float(config.resid_pdrop))
    check_exact(ra, preset)
    check_biases(ra, preset)
    ra.reset_ra_parameters(generator=torch.Generator().manual_seed(_layer_seed(seed, layer)))
    set_preserving_gates(ra)
    return ra


def _check_request(preset: str, overrides: dict[str, Any]) -> None:
    if int(transformers.__version__.split(".")[0]) < 5:
        raise NotImplementedError(f"reciprocal_attention.hf targets transformers 5.x (Cache objects, attention "
                                  f"modules returning (output, weights)); installed {transformers.__version__}")
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


def convert_layers(base: GPT2Model, plan: dict[int, tuple[str, dict[str, Any]]], seed: int) -> None:
    """Swap ``plan``'s blocks (``{layer: (preset, overrides)}``) to RA wrappers holding their GPT-2 weights.

    Every wrapper is built before any block changes, so an error leaves the model as it was.
    """
    config = base.config
    check_attn_implementation(config)
    for i in plan:
        if isinstance(base.h[i].attn, GPT2ReciprocalAttention):
            raise ValueError(f"layer {i} is already converted (preset {base.h[i].attn.preset!r}); "
                             f"unconvert_gpt2 it first")
        if not isinstance(base.h[i].attn, _gpt2.GPT2Attention):
            raise TypeError(f"layer {i}: attn is a {type(base.h[i].attn).__name__}, not a GPT2Attention")
    new = {}
    for i, (preset, overrides) in plan.items():
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
    for i, w in new.items():
        base.h[i].attn = w
    attach_call_state(base)
