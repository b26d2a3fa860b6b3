"""Train a GPT-2 (with or without Reciprocal Attention) on the offline corpus, nanoGPT style.

    ra train --preset tiny                                    # seconds on a CPU, on the committed fixture
    ra train --preset gpt2 --set model.attn=ra --out runs/ra-s0
    torchrun --standalone --nproc_per_node=8 -m reciprocal_attention.lab.train --preset gpt2
    ra train --resume runs/ra-s0                              # continue exactly where the last checkpoint was
    ra train --preset gpt2 --init-from ckpt/gpt2 --set model.attn=low_rank   # start from a HF GPT-2 checkpoint

A run directory holds ``config.toml``, ``metrics.jsonl`` (one record per log step and per evaluation),
``checkpoints/``, ``loss_curve.png``, ``summary.json`` and, if ``tensorboard`` is installed, ``tb/``.

``--init-from DIR`` (``model.init_from``): start from a local Hugging Face GPT-2 checkpoint (``save_pretrained``)
at exactly its function; the model's shape and MLP activation come from its config (see :func:`resolve_init_from`).

Exact resume: batch ``i`` of rank ``r`` is a pure function of ``(data.seed, r, i)``, the checkpoint holds the
number of batches consumed, the optimizer/scaler state and every RNG state, and the LR is a function of the step,
so a resumed run reproduces the uninterrupted run's losses step for step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, apply_overrides, list_presets, load_config, to_toml, validate
from .data import get_batch, load_manifest, load_split, prepare_fixture
from ..model import GPT, GPTConfig

log = logging.getLogger(__name__)

# Keys that may change when resuming without breaking exact continuation.
RESUME_MUTABLE = ("budget.", "eval.interval", "checkpoint.", "system.progress", "system.log_interval",
                  "system.out_dir", "data.verify")
# Dense peak FLOP/s per device: (bf16/fp16 tensor core, tf32).
PEAK_FLOPS = {"H200": (989e12, 494.5e12), "H100 PCIe": (756e12, 378e12), "H100": (989e12, 494.5e12),
              "A100": (312e12, 156e12), "L40S": (362e12, 183e12), "A10G": (125e12, 62.5e12)}


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    """Process-group facts (a single process is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> Dist:
    """Join the torchrun process group if ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are set (NCCL on CUDA, else gloo)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return d


def pick_device(pref: str, dist: Dist) -> torch.device:
    """``system.device`` resolved (``auto``: CUDA if present; under torchrun ``cuda:LOCAL_RANK``)."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"system.device={pref!r} but CUDA is not available")
        return torch.device("cuda", dist.local_rank if dist.enabled or pref == "cuda" else int(pref.split(":")[1]))
    return torch.device(pref)


def pick_dtype(pref: str, device: torch.device) -> torch.dtype:
    """``system.dtype`` resolved (``auto``: bfloat16 on CUDA with bf16 support, else float32)."""
    if pref == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[pref]


def peak_flops(device: torch.device, dtype: torch.dtype, override: float) -> float | None:
    """Per-device dense peak FLOP/s for MFU, or None when unknown (then MFU is not reported)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_FLOPS.items():
        if key in name:
            return tf32 if dtype == torch.float32 else half
    return None


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
    m = cfg.model
    shape = {k: getattr(m, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(m, k)}
    attn: str | dict = {"preset": m.attn, **m.attn_overrides} if m.attn_overrides else m.attn
    activation = "gelu" if m.activation == "auto" else m.activation
    return GPTConfig.from_preset(m.preset, vocab_size=vocab_size, dropout=m.dropout, bias=m.bias, attn=attn,
                                 ra_layers=m.ra_layers, activation=activation, **shape)


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
    if dist.master:
        if (d / "manifest.json").is_file():
            have = load_manifest(d)["tokenizer"]["name"]
            if have != cfg.data.tokenizer:
                raise ConfigError(f"{d} holds a {have} fixture corpus but data.tokenizer={cfg.data.tokenizer!r}; "
                                  f"use another system.out_dir or delete {d}")
        else:
            prepare_fixture(d, tokenizer=cfg.data.tokenizer)
    if dist.enabled:
        torch_dist.barrier()
    return d


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------

class Metrics:
    """``metrics.jsonl`` (rank 0), optionally mirrored to TensorBoard."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled, self.tb = out_dir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if resume_step is None:
            ckpt.atomic_write_text(self.path, "")
        else:  # drop what the interrupted run logged after its checkpoint: it is about to be redone
            kept = [r for r in self.read(self.path) if r["step"] <= resume_step]
            ckpt.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed; skipping TensorBoard logging (metrics.jsonl has everything)")
        else:
            self.tb = SummaryWriter(str(out_dir / "tb"))

    @staticmethod
    def read(path: Path) -> list[dict]:
        """All records of a metrics file."""
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(metrics_path: Path, out_png: Path, title: str) -> None:
    """Train and eval loss against tokens, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = Metrics.read(metrics_path)
    tr = [r for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if tr:
        ax.plot([r["tokens"] for r in tr], [r["loss"] for r in tr], lw=0.8, alpha=0.8, label="train (batch)")
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["loss"] for r in ev], "o-", ms=3, label=f"{ev[0]['split']} (fixed set)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with ckpt.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, data: np.ndarray, cfg: TrainConfig, block_size: int, device: torch.device,
             autocast: Any, dist: Dist) -> float:
    """Mean loss over the fixed evaluation batches (``eval.seed``, indices ``0..iters-1``, sharded over ranks)."""
    was_training = model.training
    model.eval()
    bs = cfg.eval.batch_size or cfg.data.batch_size
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(dist.rank, cfg.eval.iters, dist.world_size):
        x, y = get_batch(data, bs, block_size, seed=cfg.eval.seed, index=i, device=device)
        with autocast():
            _, loss = model(x, y)
        total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    if dist.enabled:
        torch_dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def _check_resume_config(saved: dict, cfg: TrainConfig, world_change: tuple[int, int] | None = None) -> None:
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


def _gather_rank_rng(device: torch.device, dist: Dist) -> list | None:
    """Every rank's torch RNG states (CPU, and its CUDA device), gathered on all ranks; None if not distributed."""
    if not dist.enabled:
        return None
    mine = [torch.get_rng_state().tolist(),
            torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else None]
    everyone: list = [None] * dist.world_size
    torch_dist.all_gather_object(everyone, mine)
    return everyone


def _restore_rank_rng(states: list, device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(states[0], dtype=torch.uint8))
    if states[1] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(states[1], dtype=torch.uint8), device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accumulate_gradients(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                         autocast: Any = contextlib.nullcontext, scaler: Any | None = None) -> torch.Tensor:
    """Forward/backward over the micro-batches of one optimizer step; returns the detached mean loss.

    Each micro-batch's loss is divided by ``len(batches)``, so the gradients are the mean over the micro-batches.
    Under DDP (``model`` a ``DistributedDataParallel``) every micro-step but the last runs in ``no_sync()``: the
    gradients accumulate locally and are all-reduced (averaged over ranks) once, in the last backward.
    ``scaler``: a float16 ``GradScaler`` (the loss is scaled before backward).
    """
    A = len(batches)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    total = None
    for micro, (x, y) in enumerate(batches):
        sync_ctx = model.no_sync() if ddp and micro < A - 1 else contextlib.nullcontext()
        with sync_ctx:
            with autocast():
                _, loss = model(x, y)
            loss = loss / A
            total = loss.detach() if total is None else total + loss.detach()
            (scaler.scale(loss) if scaler is not None else loss).backward()
    return total


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run training as configured (optionally resuming a checkpoint); return a summary dict.

    The summary has ``steps``, ``tokens``, ``train_seconds``, ``tokens_per_s``, ``mfu`` (or None),
    ``final_val_loss``, ``final_val_ppl``, ``best_val_loss``, ``out_dir`` and ``checkpoint``.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig; got {type(cfg).__name__}")
    validate(cfg)
    state = ckpt.read_state(resume) if resume is not None else None
    # With init_from the checkpoint's config fixes the model's shape. A resumed run's saved config is already
    # resolved, so it still runs when the HF directory has gone (its weights come from the run's checkpoint).
    if cfg.model.init_from and (state is None or Path(cfg.model.init_from).is_dir()):
        cfg = resolve_init_from(cfg)
    dist = setup_distributed(cfg.system.device)
    if state is not None:
        n_saved = state.get("world_size", 1)
        _check_resume_config(state["config"], cfg,
                             (n_saved, dist.world_size) if n_saved != dist.world_size else None)

    device = pick_device(cfg.system.device, dist)
    dtype = pick_dtype(cfg.system.dtype, device)
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.system.tf32
        torch.backends.cudnn.allow_tf32 = cfg.system.tf32
    if cfg.system.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.system.seed + dist.rank)  # dropout; parameter init has its own generators
    out = Path(cfg.system.out_dir)
    if dist.master:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out / "config.toml", to_toml(cfg))

    # Data
    ddir = data_dir(cfg, dist)
    manifest = load_manifest(ddir)
    train_data = load_split(ddir, "train", verify=cfg.data.verify)
    eval_data = load_split(ddir, cfg.eval.split, verify=cfg.data.verify)

    # Model and optimizer
    mcfg = gpt_config(cfg, manifest["tokenizer"]["n_vocab"])
    model = GPT(mcfg, seed=cfg.system.seed)
    if cfg.model.init_from and state is None:  # a resumed run loads its own checkpoint below
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
        del hf_model
        if dist.master:
            log.info("initialised from %s (attention %r on layers %s starts at its exact function)",
                     cfg.model.init_from, mcfg.attn, mcfg.ra_layer_indices())
    model = model.to(device)
    optimizer = model.configure_optimizers(cfg.optim.weight_decay, cfg.optim.lr, (cfg.optim.beta1, cfg.optim.beta2),
                                           device_type=device.type, eps=cfg.optim.eps)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    step, tokens, data_pos, train_seconds, best_val = 0, 0, 0, 0.0, float("inf")
    if state is not None:
        n_saved = state.get("world_size", 1)
        if n_saved != dist.world_size and dist.master:
            log.info("resuming a checkpoint written by %d process(es) on %d with the same global batch: "
                     "parameters, optimizer state, step, schedule and data order continue (only the order of "
                     "floating-point reductions differs)", n_saved, dist.world_size)
        state = ckpt.load_checkpoint(state["dir"], model, optimizer, scaler)
        rank_rng = state.get("rank_rng") or []
        if dist.rank and dist.rank < len(rank_rng):  # the RNG files hold rank 0's streams; others restore theirs
            _restore_rank_rng(rank_rng[dist.rank], device)  # (a rank the old run did not have keeps its seed)
        step, tokens, data_pos = state["step"], state["tokens"], state["data_position"]
        train_seconds = state["train_seconds"]
        best_val = state["best_val_loss"] if state.get("best_val_loss") is not None else float("inf")
        log.info("resumed from %s at step %d (%d tokens)", state["dir"], step, tokens)
    start_step = step
    newer = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")
             if int(p.name.split("_")[1]) > start_step]
    if newer:
        raise ConfigError(f"{out / 'checkpoints'} already has checkpoints after step {start_step} "
                          f"({', '.join(newer)}); resume into another directory with --out DIR")
    saved_step = step if state is not None else None
    raw_model = model
    if cfg.system.compile:
        model = torch.compile(model)
    eval_model = model
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    B, T, A = cfg.data.batch_size, mcfg.block_size, cfg.data.grad_accum
    tokens_per_step = B * T * A * dist.world_size
    max_steps = step_budget(cfg, tokens_per_step)
    decay_steps = cfg.schedule.decay_steps or max_steps
    peak = peak_flops(device, dtype, cfg.system.peak_flops)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    metrics = Metrics(out, dist.master, start_step if state is not None else None)
    if dist.master:
        log.info("model: %s, %.2fM parameters, attention %r on layers %s; %s on %s; %d tokens/step",
                 cfg.model.preset, raw_model.num_params(False) / 1e6, mcfg.attn, mcfg.ra_layer_indices(),
                 str(dtype).replace("torch.", ""), device, tokens_per_step)
        if peak is None:
            log.info("MFU not reported: unknown peak FLOP/s for %s (set system.peak_flops)", device)

    def budget_done() -> bool:
        done = (max_steps and step >= max_steps) or \
            (cfg.budget.max_seconds and train_seconds >= cfg.budget.max_seconds)
        if dist.enabled and cfg.budget.max_seconds:  # ranks' clocks differ: rank 0 decides
            flag = torch.tensor([float(bool(done))], device=device)
            torch_dist.broadcast(flag, 0)
            done = bool(flag.item())
        return bool(done)

    pbar = tqdm(total=max_steps or None, initial=step, disable=not (dist.master and cfg.system.progress),
                dynamic_ncols=True, unit="step")
    last_ckpt, val_loss, mfu, tps = None, None, None, None
    loss_acc = torch.zeros((), device=device)
    window_t, window_tokens = 0.0, 0
    model.train()
    while True:
        last = budget_done()
        # ---- evaluation (not at the step a resumed run starts from: the original run did it) ----
        eval_due = cfg.eval.interval and step % cfg.eval.interval == 0
        if (eval_due or last) and not (state is not None and step == start_step and not last):
            _sync(device)
            val_loss = evaluate(eval_model, eval_data, cfg, T, device, autocast, dist)
            best_val = min(best_val, val_loss)
            metrics.write({"kind": "eval", "step": step, "tokens": tokens, "split": cfg.eval.split,
                           "loss": val_loss, "ppl": math.exp(min(val_loss, 50.0)), "train_seconds": train_seconds})
            if dist.master:
                pbar.write(f"step {step}: {cfg.eval.split} loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f})")
        # ---- checkpoint ----
        ckpt_due = cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
        if (last or ckpt_due) and step != saved_step:
            _sync(device)
            rank_rng = _gather_rank_rng(device, dist)
            if dist.master:
                last_ckpt = ckpt.save_checkpoint(
                    out / "checkpoints", step, raw_model, optimizer,
                    {"tokens": tokens, "data_position": data_pos, "train_seconds": train_seconds,
                     "best_val_loss": best_val if best_val < float("inf") else None, "world_size": dist.world_size,
                     "rank_rng": rank_rng, "config": cfg.to_dict(),
                     "model": {"params": raw_model.num_params(False)}},
                    scaler=scaler, keep_last=cfg.checkpoint.keep_last)
            saved_step = step
            if dist.enabled:
                torch_dist.barrier()
        if last:
            break

        # ---- one optimizer step ----
        t0 = time.perf_counter()
        lr = lr_at(step, cfg, decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # One global sequence of micro-batches: step s uses numbers data_pos .. data_pos + N*A - 1, rank r the
        # r-th run of A of them. So the samples of a step depend only on the global batch, not on how it is split
        # over processes (N GPUs == 1 GPU with grad_accum x N; a resume on another N continues the same data),
        # and a single process draws exactly what it always did.
        batches = [get_batch(train_data, B, T, seed=cfg.data.seed, index=data_pos + dist.rank * A + micro,
                             device=device) for micro in range(A)]
        data_pos += A * dist.world_size
        loss_acc += accumulate_gradients(model, batches, autocast, scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.optim.grad_clip) \
            if cfg.optim.grad_clip > 0 else None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        log_now = step % cfg.system.log_interval == 0
        if log_now:
            _sync(device)
        dt = time.perf_counter() - t0
        train_seconds += dt
        window_t, window_tokens = window_t + dt, window_tokens + tokens_per_step
        pbar.update(1)
        if log_now:
            if dist.enabled:  # the mean over ranks
                torch_dist.all_reduce(loss_acc)
                loss_acc /= dist.world_size
            loss_val = loss_acc.item()
            tps = window_tokens / max(window_t, 1e-9)
            mfu = raw_model.estimate_mfu(tps / dist.world_size, peak) if peak else None
            rec = {"kind": "train", "step": step, "tokens": tokens, "loss": loss_val, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "tokens_per_s": tps, "mfu": mfu, "train_seconds": train_seconds}
            metrics.write(rec)
            pbar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
            window_t, window_tokens = 0.0, 0
        loss_acc.zero_()
    pbar.close()
    metrics.close()

    summary = {
        "steps": step, "tokens": tokens, "train_seconds": train_seconds,
        "tokens_per_s": tokens / train_seconds if train_seconds > 0 else None,
        "tokens_per_s_last_window": tps, "mfu": mfu, "final_val_loss": val_loss,
        "final_val_ppl": math.exp(val_loss) if val_loss is not None else None,
        "best_val_loss": best_val if best_val < float("inf") else None, "out_dir": str(out),
        "checkpoint": str(last_ckpt) if last_ckpt else None, "resumed_from_step": start_step if state else None,
        "params": raw_model.num_params(False), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "world_size": dist.world_size, "attention": cfg.model.attn, "ra_layers": mcfg.ra_layer_indices(),
    }
    if dist.master:
        plot_loss_curve(metrics.path, out / "loss_curve.png",
                        f"{cfg.model.preset} attn={cfg.model.attn} seed={cfg.system.seed}")
        ckpt.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if dist.enabled:
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return summary


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``ra train``."""
    p = argparse.ArgumentParser(
        prog="ra train", description="Train GPT-2 with or without Reciprocal Attention.",
        epilog="Overrides: --set section.key=value (repeatable), e.g. --set optim.lr=3e-4 --set model.attn=ra "
               "--set model.ra_layers=middle --set model.attn_overrides='{\"rank\": 16}'. Sections: model, data, "
               "optim, schedule, budget, eval, checkpoint, system.")
    p.add_argument("--preset", help=f"a preset: {', '.join(list_presets())}")
    p.add_argument("--config", help="a TOML file (applied after --preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value")
    p.add_argument("--resume", metavar="DIR", help="continue from a run dir, checkpoints dir or step dir")
    p.add_argument("--out", help="run directory (same as --set system.out_dir=DIR)")
    p.add_argument("--init-from", metavar="DIR", help="start from a local Hugging Face GPT-2 checkpoint directory "
                   "(save_pretrained); same as --set model.init_from=DIR")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ra train``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"system.out_dir={args.out}"] if args.out else []) + \
        ([f"model.init_from={args.init_from}"] if args.init_from else [])
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume takes the config from the checkpoint; drop --preset/--config")
        cfg = TrainConfig.from_dict(ckpt.read_state(args.resume)["config"])
        apply_overrides(cfg, overrides)
        validate(cfg)
    else:
        cfg = load_config(args.preset, args.config, overrides)
    if args.print_config:
        print(to_toml(cfg))
        return 0
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
