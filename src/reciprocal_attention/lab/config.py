"""Typed training configuration: dataclasses, TOML presets and ``--set section.key=value`` overrides.

A config is built in layers, each checked for unknown keys and value types:

1. the defaults below;
2. a preset (``src/reciprocal_attention/presets/NAME.toml``) or a TOML file (``--config FILE.toml``), or both
   (preset first);
3. command-line overrides ``--set optim.lr=3e-4`` (repeatable). Values are parsed for the field's type: ints,
   floats, ``true``/``false``, strings, JSON for ``dict`` fields (``--set model.attn_overrides='{"rank": 16}'``)
   and ``all``/``none``/``middle`` or a JSON list for ``model.ra_layers``.

    cfg = load_config(preset="tiny", overrides=["optim.lr=1e-3", "budget.max_steps=50"])

What types alone cannot check (ranges, choices, that the model builds) is in :mod:`.config_checks`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config_checks import validate
from .errors import ConfigError

if TYPE_CHECKING:
    from ..model import GPTConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class ModelConfig:
    """The network. ``preset`` is a named GPT size; the ``0`` fields keep that size's value.

    ``init_from``: a local Hugging Face GPT-2 checkpoint directory (``save_pretrained``: ``config.json`` + weights)
    to start from instead of a random init. Its config then fixes ``n_layer``, ``n_head``, ``n_embd``,
    ``block_size`` (``n_positions``) and ``activation`` (they override ``preset``; a non-zero / non-``auto`` value
    here that differs is an error), its ``vocab_size`` must equal the corpus tokenizer's, and ``bias`` must be
    true. The RA layers start at the checkpoint's exact function (``w_std = 1``, ``w_rec = 0``), which only some
    ``attn`` presets allow (``low_rank``, ``full``, ``standard``, ``output_gate``); see ``train.resolve_init_from``.
    A resumed run takes its weights from its checkpoint, never from here.
    """

    preset: str = "tiny"  # tiny | small-cpu | gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    n_layer: int = 0
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 0
    dropout: float = 0.0
    bias: bool = True
    attn: str = "standard"  # a ReciprocalAttention preset: standard | seed | ra | ra_disc | full | low_rank | ...
    attn_overrides: dict = field(default_factory=dict)  # extra ReciprocalAttention kwargs, e.g. {"rank": 16}
    ra_layers: str | list[int] = "all"  # all | none | middle | [layer indices]
    activation: str = "auto"  # MLP GELU: auto (gelu, or init_from's) | gelu (exact erf) | gelu_tanh (GPT-2's gelu_new)
    init_from: str = ""  # a local HF GPT-2 checkpoint dir (save_pretrained) to initialise from; "" = random init
    init: str = "gpt2"  # parameter init scheme: gpt2 | torch (see model.INIT_SCHEMES)
    tie_embeddings: bool = True  # lm_head shares the token embedding (GPT-2)
    head_bias: bool = False  # a bias on lm_head

    def gpt_config(self, vocab_size: int) -> "GPTConfig":
        """The model's :class:`~reciprocal_attention.model.GPTConfig`: every field of it that this section shares
        (by name) is copied, ``0`` sizes keep the preset's, ``activation="auto"`` is ``gelu`` and
        ``attn_overrides`` are merged into ``attn``. ``vocab_size`` comes from the corpus."""
        from ..model import GPTConfig

        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig) if hasattr(self, f.name)}
        shared = {k: v for k, v in shared.items() if not (k in PRESET_SIZE_FIELDS and v == 0)}
        if shared.get("activation") == "auto":
            shared["activation"] = "gelu"
        if self.attn_overrides:
            shared["attn"] = {"preset": self.attn, **self.attn_overrides}
        return GPTConfig.from_preset(self.preset, vocab_size=vocab_size, **shared)


# [model] fields that choose a GPTConfig rather than being one of its fields; every other [model] field is a
# GPTConfig field of the same name (tests/test_train.py checks the two stay in step).
MODEL_LAB_FIELDS = ("preset", "attn_overrides", "init_from")
# GPTConfig fields where 0 in [model] means "the preset's value".
PRESET_SIZE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size")


@dataclass
class DataConfig:
    """Where tokens come from and how batches are drawn."""

    dir: str = "data/corpus"  # a corpus built by `ra data prepare`
    fixture: bool = False  # instead build the small committed fixture into OUT/data (tests and CPU demos)
    tokenizer: str = "byte"  # the fixture's tokenizer (a prepared dir records its own)
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # data-order seed; micro-batch number i of the run (over all ranks) is a function of (seed, i)
    verify: bool = False  # sha256-check the .bin files before training


@dataclass
class OptimConfig:
    """AdamW (decay on matrices only; see ``GPT.configure_optimizers``)."""

    lr: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass
class ScheduleConfig:
    """Linear warm-up to ``optim.lr``, then cosine decay to ``min_lr_ratio * lr`` over ``decay_steps``."""

    warmup_steps: int = 100
    decay_steps: int = 0  # 0 = the step budget (budget.max_steps, or budget.max_tokens / tokens per step)
    min_lr_ratio: float = 0.1


@dataclass
class BudgetConfig:
    """When to stop: the first limit reached (``0`` = no limit; at least one must be set)."""

    max_steps: int = 0
    max_tokens: int = 0
    max_seconds: float = 0.0  # training wall clock, excluding evaluation and checkpointing


@dataclass
class EvalConfig:
    """Periodic evaluation on a fixed set of batches (the same every time and in every arm)."""

    interval: int = 200  # optimizer steps; 0 = only at the end
    iters: int = 20  # batches per evaluation
    batch_size: int = 0  # 0 = data.batch_size
    seed: int = 1234
    split: str = "val"


@dataclass
class CheckpointConfig:
    """Checkpoints under ``OUT/checkpoints``; one is always written at the end."""

    interval: int = 1000  # optimizer steps; 0 = only at the end
    keep_last: int = 2  # 0 = keep all


@dataclass
class LoopConfig:
    """What the training loop does when a step goes wrong."""

    on_nonfinite: str = "stop"  # a NaN/inf loss or grad norm: stop (with a message) | skip the update
    max_skips: int = 10  # with "skip": the run stops at the first non-finite step beyond this many


@dataclass
class SystemConfig:
    """Devices, precision, seeds, logging."""

    out_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    dtype: str = "auto"  # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 | float16 (GradScaler)
    compile: bool = False
    seed: int = 1337  # parameter init and dropout
    deterministic: bool = False  # torch.use_deterministic_algorithms
    tf32: bool = True  # TF32 for float32 matmuls/convolutions on CUDA
    log_interval: int = 10
    progress: bool = True  # tqdm bar
    peak_flops: float = 0.0  # per-device peak for MFU; 0 = from the device name (H100/H200/A100), else no MFU
    threads: int = 0  # torch.set_num_threads; 0 = leave
    flash_autotune: bool = True  # ops.settings.flash_autotune: off = one fixed config per Triton attention kernel


@dataclass
class TrainConfig:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (JSON/TOML-able)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a nested dict, rejecting unknown keys and ill-typed values."""
        cfg = cls()
        merge(cfg, d, origin="dict")
        validate(cfg)
        return cfg


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))


# ----------------------------------------------------------------------------------------------------------------
# Typed assignment
# ----------------------------------------------------------------------------------------------------------------

def _field_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _type_name(tp: Any) -> str:
    if tp is float:
        return "a number"
    if tp is dict:
        return "a table/dict (JSON on the command line)"
    if isinstance(tp, types.UnionType):
        return "'all', 'none', 'middle' or a list of layer indices"
    return {int: "an int", bool: "true or false", str: "a string"}[tp]


def _coerce(value: Any, tp: Any, key: str, from_text: bool) -> Any:
    """``value`` as type ``tp`` (parsing it if it came from the command line), or a ConfigError naming ``key``."""
    try:
        if from_text:
            value = _parse_text(value, tp)
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: cannot parse {value!r} as {_type_name(tp)} ({e})") from None
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
    }.get(tp)
    if ok is None:  # str | list[int]
        ok = lambda v: isinstance(v, str) or (isinstance(v, list) and all(  # noqa: E731
            isinstance(i, int) and not isinstance(i, bool) for i in v))
    if not ok(value):
        raise ConfigError(f"{key} must be {_type_name(tp)}; got {value!r} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number; got {value!r}")
    return float(value) if tp is float else value


def _parse_text(text: str, tp: Any) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError("expected true or false")
        return low in ("true", "1", "yes")
    if tp is int:
        return int(text.replace("_", ""))
    if tp is float:
        return float(text.replace("_", ""))
    if tp is dict:
        return json.loads(text)
    if tp is str:
        return text
    stripped = text.strip()
    return json.loads(stripped) if stripped.startswith("[") else stripped


def set_value(cfg: TrainConfig, key: str, value: Any, from_text: bool = False) -> None:
    """Assign ``cfg.<section>.<name> = value`` after checking the key exists and the type fits."""
    if not isinstance(key, str) or key.count(".") != 1:
        raise ConfigError(f"config keys look like 'section.name' (sections: {', '.join(SECTIONS)}); got {key!r}")
    sec_name, name = key.split(".")
    if sec_name not in SECTIONS:
        raise ConfigError(f"unknown config section {sec_name!r} in {key!r}; valid sections: {', '.join(SECTIONS)}")
    section = getattr(cfg, sec_name)
    hints = _field_types(section)
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r}; valid keys in [{sec_name}]: {', '.join(hints)}")
    setattr(section, name, _coerce(value, hints[name], key, from_text))


def merge(cfg: TrainConfig, d: dict, origin: str) -> None:
    """Apply a nested ``{section: {key: value}}`` dict (from TOML or a checkpoint) to ``cfg``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{origin}: expected a table of sections; got {type(d).__name__}")
    for sec_name, table in d.items():
        if sec_name not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section [{sec_name}]; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: [{sec_name}] must be a table; got {table!r}")
        for name, value in table.items():
            try:
                set_value(cfg, f"{sec_name}.{name}", value)
            except ConfigError as e:
                raise ConfigError(f"{origin}: {e}") from None


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> None:
    """Apply ``section.key=value`` strings (the ``--set`` arguments)."""
    keys = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value; got {item!r}")
        key, value = item.split("=", 1)
        keys.append(key.strip())
        set_value(cfg, keys[-1], value, from_text=True)
    if "data.dir" in keys and "data.fixture" not in keys:  # an explicit corpus replaces a preset's fixture
        cfg.data.fixture = False


# ----------------------------------------------------------------------------------------------------------------
# Presets and validation
# ----------------------------------------------------------------------------------------------------------------

def list_presets() -> list[str]:
    """Names of the TOML presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file, with its path in any error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then ``preset``, then ``config_file``, then ``overrides``; validated."""
    cfg = TrainConfig()
    if preset is not None:
        if preset not in list_presets():
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")
        merge(cfg, read_toml(PRESET_DIR / f"{preset}.toml"), origin=f"preset {preset}")
    if config_file is not None:
        merge(cfg, read_toml(config_file), origin=str(config_file))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML text (for ``--print-config`` and the run directory)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + " }" if v else "{}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    out = []
    for sec, table in cfg.to_dict().items():
        out.append(f"[{sec}]")
        out.extend(f"{k} = {fmt(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)
