"""What a training config's types alone cannot check: ranges, choices, a budget and a schedule that fit together,
and that the configured model builds. Every failure is a :class:`ConfigError` naming the key and what it expects.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any

from .errors import ConfigError

# The checks take a `config.TrainConfig` (typed `Any` here: config.py imports this module to validate what it loads,
# and this one must not import it back, not even for type checking)

DTYPES = ("auto", "float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("stop", "skip")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_finite_numbers(cfg: Any) -> None:
    for sec in dataclasses.fields(cfg):
        sec_name, section = sec.name, getattr(cfg, sec.name)
        for name, tp in typing.get_type_hints(type(section)).items():
            v = getattr(section, name)
            if tp is float and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ConfigError(f"{sec_name}.{name} must be a finite number; got {v!r}")


def validate(cfg: Any) -> None:
    """Check ranges and choices that types alone cannot, and that the model builds (raises ConfigError naming
    the key)."""
    from ..attention import PRESETS as ATTN_PRESETS
    from ..model import ACTIVATIONS, GPT_PRESETS
    from .tokenizer import TOKENIZERS

    m, d, o, s, b, e, c, y = (cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.budget, cfg.eval, cfg.checkpoint,
                              cfg.system)
    _check_finite_numbers(cfg)
    _check(m.preset in GPT_PRESETS, f"model.preset must be one of {list(GPT_PRESETS)}; got {m.preset!r}")
    _check(m.attn in ATTN_PRESETS, f"model.attn must be one of {list(ATTN_PRESETS)}; got {m.attn!r}")
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        _check(getattr(m, k) >= 0, f"model.{k} must be >= 0 (0 = the preset's); got {getattr(m, k)}")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1); got {m.dropout}")
    _check(not isinstance(m.ra_layers, str) or m.ra_layers in ("all", "none", "middle"),
           f"model.ra_layers must be 'all', 'none', 'middle' or a list of layer indices; got {m.ra_layers!r}")
    _check(m.activation in ("auto",) + ACTIVATIONS,
           f"model.activation must be one of {('auto',) + ACTIVATIONS}; got {m.activation!r}")
    _check(not m.init_from or m.bias, "model.init_from loads a GPT-2 checkpoint, whose Linear and LayerNorm layers "
           "have biases: model.bias must be true")
    _check(d.tokenizer in TOKENIZERS, f"data.tokenizer must be one of {TOKENIZERS}; got {d.tokenizer!r}")
    _check(d.fixture or bool(d.dir), "data.dir must name a prepared corpus (or set data.fixture = true)")
    for k in ("batch_size", "grad_accum"):
        _check(getattr(d, k) >= 1, f"data.{k} must be >= 1; got {getattr(d, k)}")
    _check(o.lr > 0, f"optim.lr must be a finite number > 0; got {o.lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {o.weight_decay}")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1/beta2 must be in [0, 1); got {o.beta1}, {o.beta2}")
    _check(o.eps > 0 and o.grad_clip >= 0, "optim.eps must be > 0 and optim.grad_clip >= 0")
    _check(s.warmup_steps >= 0 and s.decay_steps >= 0, "schedule.warmup_steps and decay_steps must be >= 0")
    _check(0.0 <= s.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio must be in [0, 1]; got {s.min_lr_ratio}")
    _check(min(b.max_steps, b.max_tokens, b.max_seconds) >= 0, "budget values must be >= 0")
    _check(b.max_steps > 0 or b.max_tokens > 0 or b.max_seconds > 0,
           "set at least one budget: budget.max_steps, budget.max_tokens or budget.max_seconds")
    _check(b.max_steps > 0 or b.max_tokens > 0 or s.decay_steps > 0,
           "with only a wall-clock budget the LR schedule has no horizon: set schedule.decay_steps")
    _check(e.interval >= 0 and e.iters >= 1 and e.batch_size >= 0, "eval.interval >= 0, eval.iters >= 1, "
           "eval.batch_size >= 0 required")
    _check(e.split in ("val", "test", "train"), f"eval.split must be val, test or train; got {e.split!r}")
    _check(c.interval >= 0 and c.keep_last >= 0, "checkpoint.interval and checkpoint.keep_last must be >= 0")
    _check(y.dtype in DTYPES, f"system.dtype must be one of {DTYPES}; got {y.dtype!r}")
    _check(y.device == "auto" or y.device == "cpu" or y.device.startswith("cuda") or y.device == "mps",
           f"system.device must be auto, cpu, cuda or cuda:N; got {y.device!r}")
    _check(y.log_interval >= 1 and y.threads >= 0 and y.peak_flops >= 0,
           "system.log_interval >= 1, system.threads >= 0 and system.peak_flops >= 0 required")
    _check(bool(y.out_dir), "system.out_dir must not be empty")
    _check(cfg.train.on_nonfinite in NONFINITE_POLICIES,
           f"train.on_nonfinite must be one of {NONFINITE_POLICIES}; got {cfg.train.on_nonfinite!r}")
    _check(cfg.train.max_skips >= 0, f"train.max_skips must be >= 0; got {cfg.train.max_skips}")
    if not m.init_from:  # with init_from the shape comes from the checkpoint: checked once it is read
        validate_model(cfg)


# A vocabulary size for building the model to check its config; the real one comes from the corpus and does not
# change which configs are valid.
_CHECK_VOCAB = 257


def attention_keys() -> list[str]:
    """The keys ``model.attn_overrides`` may set: ReciprocalAttention's arguments that the model config does not
    fix, plus ``preset``."""
    from ..attention import ReciprocalAttention

    fixed = {"self", "n_embd", "n_head", "block_size"}
    params = inspect.signature(ReciprocalAttention.__init__).parameters
    return ["preset"] + [k for k, p in params.items()
                         if k not in fixed and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def validate_model(cfg: Any, vocab_size: int = _CHECK_VOCAB) -> None:
    """Build the configured model on the meta device (no memory, no weights) so every shape or attention error
    is a :class:`ConfigError` before anything is written."""
    import torch

    from ..model import GPT

    valid = attention_keys()
    unknown = sorted(set(cfg.model.attn_overrides) - set(valid))
    _check(not unknown, f"model.attn_overrides: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
    try:
        mcfg = cfg.model.gpt_config(vocab_size)
        with torch.device("meta"):
            GPT(mcfg, seed=0)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the [model] section does not build a model: {e}") from None
