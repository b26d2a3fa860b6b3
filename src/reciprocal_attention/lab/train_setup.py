"""Setting a training run up: config-derived quantities, the HF init, data, model, optimizer, and restoring a
checkpoint into them. :mod:`.train` runs the loop."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .config_checks import validate_model
from .data import load_manifest, load_split, prepare_fixture
from .metrics import Metrics
from .runtime import Dist, peak_flops, pick_device, pick_dtype, restore_rank_rng
from ..model import GPT, GPTConfig

log = logging.getLogger(__name__)

# Keys that may change when resuming without breaking exact continuation.
RESUME_MUTABLE = ("budget.", "eval.interval", "checkpoint.", "system.progress", "system.log_interval",
                  "system.out_dir", "data.verify", "train.")


# ----------------------------------------------------------------------------------------------------------------
# Config-derived quantities
# ----------------------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig, decay_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, cosine decay to ``min_lr_ratio * lr`` at ``decay_steps``."""
    lr, warm = cfg.optim.lr, cfg.schedule.warmup_steps
    min_lr = lr * cfg.schedule.min_lr_ratio
    if step < warm:
        return lr * (step + 1) / warm
    if step >= decay_steps:
        return min_lr
    ratio = (step - warm) / max(1, decay_steps - warm)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def step_budget(cfg: TrainConfig, tokens_per_step: int) -> int:
    """The number of optimizer steps the step/token budgets allow (0 = only a wall-clock budget)."""
    limits = []
    if cfg.budget.max_steps:
        limits.append(cfg.budget.max_steps)
    if cfg.budget.max_tokens:
        limits.append(math.ceil(cfg.budget.max_tokens / tokens_per_step))
    return min(limits) if limits else 0


def gpt_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    """The model's :class:`GPTConfig` from the training config and the corpus vocabulary."""
    return cfg.model.gpt_config(vocab_size)


def _import_hf() -> Any:
    try:
        from .. import hf
    except ImportError as e:
        raise ImportError(f"model.init_from (--init-from) loads a Hugging Face checkpoint: {e}") from e
    return hf


def resolve_init_from(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` whose model shape and activation are those of the ``model.init_from`` checkpoint.

    ``n_layer``, ``n_head``, ``n_embd``, ``block_size`` (``n_positions``) and ``activation`` (``gelu_tanh`` for
    GPT-2's ``gelu_new``) are written into ``cfg.model``, so the run directory's ``config.toml`` and every
    checkpoint record the real architecture (a resumed run needs no access to the HF directory). They override
    ``model.preset``'s size; a value the user set explicitly (non-zero, or an activation other than ``auto``)
    that differs from the checkpoint is a :class:`ConfigError`, never silently replaced. Also checked here, before
    any data or weights are touched: that the configured attention has an exact function-preserving init.
    """
    m = cfg.model
    if not m.init_from:
        return cfg
    hf = _import_hf()
    try:
        hcfg = hf.read_gpt2_config(m.init_from)
        act = hf.gpt_activation(hcfg)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from={m.init_from!r}: {e}") from None
    want = {"n_layer": hcfg.n_layer, "n_head": hcfg.n_head, "n_embd": hcfg.n_embd, "block_size": hcfg.n_positions,
            "activation": act}
    clash = [f"model.{k}={getattr(m, k)!r} (checkpoint: {v!r})" for k, v in want.items()
             if getattr(m, k) not in (0, "auto", v)]
    if clash:
        raise ConfigError(f"model.init_from={m.init_from!r} fixes the model's shape and activation, but the config "
                          f"sets {', '.join(clash)}; drop these settings (0 / 'auto' take the checkpoint's)")
    out = copy.deepcopy(cfg)
    for k, v in want.items():
        setattr(out.model, k, v)
    changed = {k: v for k, v in want.items() if getattr(m, k) != v}
    if changed:
        log.info("model.init_from=%s: model %s from the checkpoint's config", m.init_from,
                 ", ".join(f"{k}={v}" for k, v in changed.items()))
    validate_model(out, hcfg.vocab_size)
    try:
        hf.check_gpt_init(gpt_config(out, hcfg.vocab_size), hcfg)
    except ValueError as e:
        raise ConfigError(f"model.init_from={m.init_from!r}: {e}") from None
    return out


def data_dir(cfg: TrainConfig, dist: Dist) -> Path:
    """The corpus directory; builds the fixture corpus in ``OUT/data`` when ``data.fixture`` is set."""
    if not cfg.data.fixture:
        return Path(cfg.data.dir)
    d = Path(cfg.system.out_dir) / "data"

    def build() -> None:
        if (d / "manifest.json").is_file():
            have = load_manifest(d)["tokenizer"]["name"]
            if have != cfg.data.tokenizer:
                raise ConfigError(f"{d} holds a {have} fixture corpus but data.tokenizer={cfg.data.tokenizer!r}; "
                                  f"use another system.out_dir or delete {d}")
        else:
            prepare_fixture(d, tokenizer=cfg.data.tokenizer)

    dist.on_master(build, f"building the fixture corpus in {d}")
    return d


def check_resume_config(saved: dict, cfg: TrainConfig, world_change: tuple[int, int] | None = None) -> None:
    """Refuse a resume whose config would not continue the run. ``world_change = (saved_N, N)`` when the number
    of processes differs: then ``data.batch_size`` and ``data.grad_accum`` may change too, as long as the global
    batch (``batch_size * grad_accum * N`` sequences per step) stays the same, so steps, schedule and tokens mean
    what they meant."""
    now = cfg.to_dict()
    # A key added after the checkpoint was written counts as its default (what the old run computed).
    defaults = TrainConfig().to_dict()
    saved = {s: {**defaults.get(s, {}), **saved.get(s, {})} for s in set(defaults) | set(saved)}
    diffs = [f"{s}.{k}" for s in now for k in now[s] if saved.get(s, {}).get(k) != now[s][k]]
    mutable = RESUME_MUTABLE + (("data.batch_size", "data.grad_accum") if world_change else ())
    bad = [k for k in diffs if not k.startswith(mutable)]
    if world_change and not bad:
        n_saved, n_now = world_change
        before = saved["data"]["batch_size"] * saved["data"]["grad_accum"] * n_saved
        after = cfg.data.batch_size * cfg.data.grad_accum * n_now
        if before != after:
            raise ConfigError(f"the checkpoint was written by {n_saved} process(es) with a global batch of {before} "
                              f"sequences per step (batch_size x grad_accum x N); with {n_now} now it would be "
                              f"{after}: set data.batch_size / data.grad_accum so the product stays {before}")
    if bad:
        raise ConfigError(f"resuming with a different {', '.join(bad)} would not continue the run exactly; only "
                          f"{', '.join(RESUME_MUTABLE)} may change")


# ----------------------------------------------------------------------------------------------------------------
# The run: what the loop reads (Run) and what it advances and checkpoints (Progress)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """The loop's position; with the weights, optimizer and RNG states it is what a checkpoint holds."""

    step: int = 0
    tokens: int = 0
    data_pos: int = 0
    train_seconds: float = 0.0
    best_val: float = float("inf")
    skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient (train.on_nonfinite = "skip")

    def state(self) -> dict[str, Any]:
        """The checkpoint fields (strict JSON)."""
        return {"tokens": self.tokens, "data_position": self.data_pos, "train_seconds": self.train_seconds,
                "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
                "skipped_steps": self.skipped}


@dataclass
class Run:
    """Everything fixed for the duration of a run."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    dtype: torch.dtype
    out: Path
    mcfg: GPTConfig
    raw_model: GPT
    optimizer: torch.optim.Optimizer
    scaler: Any
    train_data: np.ndarray
    eval_data: np.ndarray
    model: torch.nn.Module = None  # what the step calls: raw_model, compiled and/or DDP-wrapped
    eval_model: torch.nn.Module = None  # compiled but not DDP-wrapped
    metrics: Metrics = None
    tokens_per_step: int = 0
    max_steps: int = 0
    decay_steps: int = 0
    peak: float | None = None
    resumed_from: int | None = None  # the step of the checkpoint this process resumed, if any
    last_ckpt: Path | None = None
    saved_step: int | None = None
    window: list = field(default_factory=lambda: [0.0, 0])  # seconds and tokens since the last log

    def autocast(self) -> Any:
        """The forward's mixed-precision context (none in float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------

def setup_system(cfg: TrainConfig, dist: Dist) -> tuple[torch.device, torch.dtype]:
    """Device, dtype, threads, TF32, determinism and the dropout seed."""
    device = pick_device(cfg.system.device, dist)
    dtype = pick_dtype(cfg.system.dtype, device)
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    from ..ops import settings as ops_settings

    ops_settings.flash_autotune = cfg.system.flash_autotune  # several runs sharing a card: no autotuning races
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.system.tf32
        torch.backends.cudnn.allow_tf32 = cfg.system.tf32
    if cfg.system.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.system.seed + dist.rank)  # dropout; parameter init has its own generators
    return device, dtype


def build_model(cfg: TrainConfig, mcfg: GPTConfig, manifest: dict, dist: Dist, fresh: bool) -> GPT:
    """The GPT of ``mcfg`` (on the CPU): seeded init, or ``model.init_from``'s weights for a fresh run."""
    model = GPT(mcfg, seed=cfg.system.seed)
    if not (cfg.model.init_from and fresh):  # a resumed run loads its own checkpoint
        return model
    hf = _import_hf()
    try:
        hf_model = hf.load_pretrained_gpt2(cfg.model.init_from)
        if hf_model.config.vocab_size != mcfg.vocab_size:
            raise ValueError(f"its vocab_size {hf_model.config.vocab_size} differs from the corpus tokenizer's "
                             f"{mcfg.vocab_size} ({manifest['tokenizer']['name']}): the token ids would not "
                             f"mean the same")
        hf.init_gpt_from_hf(model, hf_model)  # never re-initialised afterwards
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from={cfg.model.init_from!r}: {e}") from None
    if dist.master:
        log.info("initialised from %s (attention %r on layers %s starts at its exact function)",
                 cfg.model.init_from, mcfg.attn, mcfg.ra_layer_indices())
    return model


def build_run(cfg: TrainConfig, out: Path, dist: Dist, fresh: bool) -> Run:
    """Data, model, optimizer and the derived step counts (nothing is restored yet)."""
    device, dtype = setup_system(cfg, dist)
    ddir = data_dir(cfg, dist)
    manifest = load_manifest(ddir)
    train_data = load_split(ddir, "train", verify=cfg.data.verify)
    eval_data = load_split(ddir, cfg.eval.split, verify=cfg.data.verify)
    mcfg = gpt_config(cfg, manifest["tokenizer"]["n_vocab"])
    model = build_model(cfg, mcfg, manifest, dist, fresh).to(device)
    optimizer = model.configure_optimizers(cfg.optim.weight_decay, cfg.optim.lr, (cfg.optim.beta1, cfg.optim.beta2),
                                           device_type=device.type, eps=cfg.optim.eps)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    run = Run(cfg, dist, device, dtype, out, mcfg, model, optimizer, scaler, train_data, eval_data)
    run.tokens_per_step = cfg.data.batch_size * mcfg.block_size * cfg.data.grad_accum * dist.world_size
    run.max_steps = step_budget(cfg, run.tokens_per_step)
    run.decay_steps = cfg.schedule.decay_steps or run.max_steps
    run.peak = peak_flops(device, dtype, cfg.system.peak_flops)
    return run


def restore(run: Run, state: dict[str, Any] | None) -> Progress:
    """Load the checkpoint ``state`` describes into the run (weights, optimizer, RNGs); its :class:`Progress`."""
    if state is None:
        return Progress()
    n_saved = state["world_size"]
    if n_saved != run.dist.world_size and run.dist.master:
        log.info("resuming a checkpoint written by %d process(es) on %d with the same global batch: "
                 "parameters, optimizer state, step, schedule and data order continue (only the order of "
                 "floating-point reductions differs)", n_saved, run.dist.world_size)
    state = ckpt.load_checkpoint(state["dir"], run.raw_model, run.optimizer, run.scaler)
    rank_rng = state["rank_rng"] or []
    if run.dist.rank and run.dist.rank < len(rank_rng):  # the RNG files hold rank 0's streams; others restore theirs
        restore_rank_rng(rank_rng[run.dist.rank], run.device)  # (a rank the old run did not have keeps its seed)
    best = state["best_val_loss"]
    prog = Progress(state["step"], state["tokens"], state["data_position"], state["train_seconds"],
                    best if best is not None else float("inf"), state["skipped_steps"])
    run.resumed_from = run.saved_step = prog.step
    log.info("resumed from %s at step %d (%d tokens)", state["dir"], prog.step, prog.tokens)
    return prog


def wrap_model(run: Run) -> None:
    """``torch.compile`` and DDP wrappers, as configured."""
    model = run.raw_model
    if run.cfg.system.compile:
        model = torch.compile(model)
    run.eval_model = model
    if run.dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.dist.local_rank] if run.device.type == "cuda" else None)
    run.model = model
