"""Train a GPT-2 (with or without Reciprocal Attention) on the offline corpus, nanoGPT style.

    ra train --preset tiny                                    # seconds on a CPU, on the committed fixture
    ra train --preset gpt2 --set model.attn=ra --out runs/ra-s0
    torchrun --standalone --nproc_per_node=8 -m reciprocal_attention.lab.train --preset gpt2
    ra train --resume runs/ra-s0                              # continue exactly where the last checkpoint was
    ra train --preset gpt2 --init-from ckpt/gpt2 --set model.attn=low_rank   # start from a HF GPT-2 checkpoint

A run directory (see :mod:`.rundir` and ``docs/RUNS.md``) holds ``config.toml``, ``metrics.jsonl``,
``checkpoints/``, ``loss_curve.png``, ``summary.json`` and, if ``tensorboard`` is installed, ``tb/``. One process
writes it at a time (``.lock``); a kill at any moment leaves it resumable.

``--init-from DIR`` (``model.init_from``): start from a local Hugging Face GPT-2 checkpoint (``save_pretrained``)
at exactly its function; the model's shape and MLP activation come from its config (see :func:`resolve_init_from`).

Exact resume: batch ``i`` of rank ``r`` is a pure function of ``(data.seed, r, i)``, the checkpoint holds the
number of batches consumed, the optimizer/scaler state and every RNG state, and the LR is a function of the step,
so a resumed run reproduces the uninterrupted run's losses step for step.

The loop is :func:`train` -> :func:`~.train_step.train_step` (one optimizer step with the non-finite guard), with
:func:`eval_hook`, :func:`checkpoint_hook` and :func:`log_hook` around it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from . import checkpoint as ckpt
from . import rundir
from .atomic import dumps, write_json, write_text
from .config import ConfigError, TrainConfig, apply_overrides, list_presets, load_config, to_toml, validate
from .config_checks import validate_model
from .data import get_batch
from .errors import NonFiniteError, RunStopped
from .metrics import Metrics, plot_loss_curve
from .runlock import RunLock
from .runtime import Dist, device_name, gather_rank_rng, setup_distributed, sync
from .stop_signals import StopSignals
from .train_setup import (GPT, Progress, Run, build_run, check_resume_config, gpt_config, lr_at, resolve_init_from,
                          restore, step_budget, wrap_model)
from .train_step import StepResult, accumulate_gradients, train_step

__all__ = ["GPT", "Metrics", "Progress", "Run", "RunStopped", "TrainConfig", "accumulate_gradients", "evaluate",
           "gpt_config", "lr_at", "main", "plot_loss_curve", "resolve_init_from", "step_budget", "train", "train_step"]
log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Evaluation, and the hooks around the step (the step itself: :mod:`.train_step`)
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


def eval_hook(run: Run, prog: Progress, last: bool) -> float | None:
    """Evaluate when due (every ``eval.interval`` steps and at the end); log it; the loss or None."""
    if not ((run.cfg.eval.interval and prog.step % run.cfg.eval.interval == 0) or last):
        return None
    sync(run.device)
    val = evaluate(run.eval_model, run.eval_data, run.cfg, run.mcfg.block_size, run.device, run.autocast, run.dist)
    prog.best_val = min(prog.best_val, val)
    ppl = math.exp(min(val, 50.0)) if math.isfinite(val) else float("nan")
    run.metrics.write({"kind": "eval", "step": prog.step, "tokens": prog.tokens, "split": run.cfg.eval.split,
                       "loss": val, "ppl": ppl, "train_seconds": prog.train_seconds})
    if run.dist.master:
        tqdm.write(f"step {prog.step}: {run.cfg.eval.split} loss {val:.4f} (ppl {ppl:.2f})")
    return val


def checkpoint_hook(run: Run, prog: Progress, last: bool) -> None:
    """Save and commit a checkpoint when due (every ``checkpoint.interval`` steps and at the end), unless this
    step's is already on disk. Non-finite weights stop the run on every rank and write nothing."""
    due = run.cfg.checkpoint.interval and prog.step % run.cfg.checkpoint.interval == 0
    if not (last or due) or prog.step == run.saved_step:
        return
    sync(run.device)
    bad = ckpt.first_nonfinite(run.raw_model.state_dict().items())
    if bad is not None:  # identical on every rank (DDP keeps the weights equal), so all stop together
        raise NonFiniteError(f"step {prog.step}: weight {bad} is not finite; no checkpoint written, the last "
                             f"committed one is {run.last_ckpt or 'none'}. Lower optim.lr or set optim.grad_clip")
    rank_rng = gather_rank_rng(run.device, run.dist)

    def save() -> Path:
        extra = {"world_size": run.dist.world_size, "rank_rng": rank_rng, "config": run.cfg.to_dict(),
                 "model": {"params": run.raw_model.num_params(False)}}
        return ckpt.save_checkpoint(run.out / "checkpoints", prog.step, run.raw_model, run.optimizer,
                                    {**prog.state(), **extra}, scaler=run.scaler,
                                    keep_last=run.cfg.checkpoint.keep_last)

    saved = run.dist.on_master(save, f"writing the step-{prog.step} checkpoint")
    if run.dist.master:
        run.last_ckpt = saved
    run.saved_step = prog.step


def log_hook(run: Run, prog: Progress, res: StepResult, pbar: tqdm) -> dict[str, Any] | None:
    """Every ``system.log_interval`` steps: the step's loss (mean over ranks), LR, grad norm, throughput, MFU."""
    run.window[0] += res.seconds
    run.window[1] += run.tokens_per_step
    pbar.update(1)
    if prog.step % run.cfg.system.log_interval:
        return None
    loss = res.loss
    if run.dist.enabled:  # the mean over ranks
        torch_dist.all_reduce(loss)
        loss /= run.dist.world_size
    tps = run.window[1] / max(run.window[0], 1e-9)
    mfu = run.raw_model.estimate_mfu(tps / run.dist.world_size, run.peak) if run.peak else None
    rec = {"kind": "train", "step": prog.step, "tokens": prog.tokens, "loss": loss.item(), "lr": res.lr,
           "grad_norm": float(res.grad_norm) if res.grad_norm is not None else None, "tokens_per_s": tps,
           "mfu": mfu, "train_seconds": prog.train_seconds, **({"skipped": True} if res.skipped else {})}
    run.metrics.write(rec)
    pbar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
    run.window[:] = [0.0, 0]
    return rec


def budget_done(run: Run, prog: Progress) -> bool:
    """Whether a step or token budget, or the wall-clock budget (rank 0's clock), is spent."""
    cfg = run.cfg
    done = (run.max_steps and prog.step >= run.max_steps) or \
        (cfg.budget.max_seconds and prog.train_seconds >= cfg.budget.max_seconds)
    if run.dist.enabled and cfg.budget.max_seconds:  # ranks' clocks differ: rank 0 decides
        flag = torch.tensor([float(bool(done))], device=run.device)
        torch_dist.broadcast(flag, 0)
        done = bool(flag.item())
    return bool(done)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def _loop(run: Run, prog: Progress, stop: StopSignals | None = None) -> tuple[float | None, dict | None]:
    """Steps until the budget is spent; the last evaluation loss and the last train log record. A stop signal
    (``stop``) ends it after the current step and its checkpoint, raising :class:`RunStopped`."""
    pbar = tqdm(total=run.max_steps or None, initial=prog.step, dynamic_ncols=True, unit="step",
                disable=not (run.dist.master and run.cfg.system.progress))
    val_loss, rec = None, None
    run.model.train()
    try:
        while True:
            last = budget_done(run, prog)
            val = eval_hook(run, prog, last)
            val_loss = val if val is not None else val_loss
            checkpoint_hook(run, prog, last)
            if last:
                return val_loss, rec
            res = train_step(run, prog)
            logged = log_hook(run, prog, res, pbar)
            rec = logged if logged is not None else rec
            if stop is not None and stop.signum is not None:
                checkpoint_hook(run, prog, last=True)
                raise RunStopped(stop.signum, prog.step, str(run.out))
    finally:
        pbar.close()


def _summary(run: Run, prog: Progress, val_loss: float | None, rec: dict | None) -> dict[str, Any]:
    cfg, ts = run.cfg, prog.train_seconds
    return {
        "steps": prog.step, "tokens": prog.tokens, "train_seconds": ts,
        "tokens_per_s": prog.tokens / ts if ts > 0 else None,
        "tokens_per_s_last_window": rec["tokens_per_s"] if rec else None, "mfu": rec["mfu"] if rec else None,
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(min(val_loss, 700.0)) if val_loss is not None and math.isfinite(val_loss) else None,
        "best_val_loss": prog.best_val if math.isfinite(prog.best_val) else None, "out_dir": str(run.out),
        "checkpoint": str(run.last_ckpt) if run.last_ckpt else None, "resumed_from_step": run.resumed_from,
        "skipped_steps": prog.skipped, "params": run.raw_model.num_params(False), "device": str(run.device),
        "device_name": device_name(run.device), "dtype": str(run.dtype).replace("torch.", ""),
        "world_size": run.dist.world_size,
        "attention": cfg.model.attn, "ra_layers": run.mcfg.ra_layer_indices(),
    }


def _run_locked(cfg: TrainConfig, resume: str | os.PathLike | None, out: Path, dist: Dist) -> dict[str, Any]:
    """The run, once this process may write ``out`` (rank 0 holds its lock)."""
    state = dist.on_master(lambda: rundir.prepare(out, resume), f"preparing the run directory {out}")
    if not dist.master and resume is not None:
        state = rundir.committed_state(resume)
    if state is not None:
        n_saved = state["world_size"]
        check_resume_config(state["config"], cfg, (n_saved, dist.world_size) if n_saved != dist.world_size else None)
    run = build_run(cfg, out, dist, fresh=state is None)
    prog = restore(run, state)
    if dist.master:
        write_text(out / rundir.CONFIG_FILE, to_toml(cfg))
    wrap_model(run)
    run.metrics = Metrics(out, dist.master, run.resumed_from)
    if dist.master:
        log.info("model: %s, %.2fM parameters, attention %r on layers %s; %s on %s; %d tokens/step",
                 cfg.model.preset, run.raw_model.num_params(False) / 1e6, run.mcfg.attn, run.mcfg.ra_layer_indices(),
                 str(run.dtype).replace("torch.", ""), run.device, run.tokens_per_step)
        if run.peak is None:
            log.info("MFU not reported: unknown peak FLOP/s for %s (set system.peak_flops)", run.device)
    try:
        with StopSignals(enabled=not dist.enabled) as stop:
            val_loss, rec = _loop(run, prog, stop)
    finally:
        run.metrics.close()
    summary = _summary(run, prog, val_loss, rec)

    def finish() -> None:
        plot_loss_curve(run.metrics.path, out / "loss_curve.png",
                        f"{cfg.model.preset} attn={cfg.model.attn} seed={cfg.system.seed}")
        write_json(out / "summary.json", summary)

    dist.on_master(finish, "writing the run's summary")
    return summary


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None,
          out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run training as configured (optionally resuming a checkpoint); return a summary dict.

    The run writes into ``out_dir`` if given, else the run directory of ``resume`` (wherever it has been moved),
    else ``cfg.system.out_dir``. The whole config, the model included, is checked before anything is written.
    The summary has ``steps``, ``tokens``, ``train_seconds``, ``tokens_per_s``, ``mfu`` (or None),
    ``final_val_loss``, ``final_val_ppl``, ``best_val_loss``, ``out_dir`` and ``checkpoint``. A single-process run
    stopped by SIGTERM or Ctrl-C checkpoints the step it reached and raises :class:`RunStopped` (resumable).
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig; got {type(cfg).__name__}")
    validate(cfg)
    if out_dir is not None:
        out = Path(out_dir)
    else:
        out = rundir.run_dir_of(resume) if resume is not None else Path(cfg.system.out_dir)
    cfg = copy.deepcopy(cfg)
    cfg.system.out_dir = str(out)
    # With init_from the checkpoint's config fixes the model's shape. A resumed run's saved config is already
    # resolved, so it still runs when the HF directory has gone (its weights come from the run's checkpoint).
    if cfg.model.init_from and (resume is None or Path(cfg.model.init_from).is_dir()):
        cfg = resolve_init_from(cfg)
    elif cfg.model.init_from:
        validate_model(cfg)
    dist = setup_distributed(cfg.system.device)
    try:
        with contextlib.ExitStack() as held:  # rank 0 holds the run's lock; every rank stops if it cannot
            dist.on_master(lambda: held.enter_context(RunLock(out)), f"locking the run directory {out}")
            return _run_locked(cfg, resume, out, dist)
    finally:
        if dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``ra train``."""
    p = argparse.ArgumentParser(
        prog="ra train", description="Train GPT-2 with or without Reciprocal Attention.",
        epilog="Overrides: --set section.key=value (repeatable), e.g. --set optim.lr=3e-4 --set model.attn=ra "
               "--set model.ra_layers=middle --set model.attn_overrides='{\"rank\": 16}'. Sections: model, data, "
               "optim, schedule, budget, eval, checkpoint, train, system.")
    p.add_argument("--preset", help=f"a preset: {', '.join(list_presets())}")
    p.add_argument("--config", help="a TOML file (applied after --preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value")
    p.add_argument("--resume", metavar="DIR", help="continue a run (its directory, checkpoints/ or a step dir); it "
                   "writes into that run directory unless --out is given")
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
    overrides = list(args.overrides) + ([f"model.init_from={args.init_from}"] if args.init_from else [])
    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume takes the config from the checkpoint; drop --preset/--config")
        cfg = rundir.resume_config(args.resume)
        apply_overrides(cfg, overrides + ([f"system.out_dir={args.out}"] if args.out else []))
        validate(cfg)
    else:
        cfg = load_config(args.preset, args.config, overrides + ([f"system.out_dir={args.out}"] if args.out else []))
    if args.print_config:
        print(to_toml(cfg))
        return 0
    try:
        summary = train(cfg, resume=args.resume, out_dir=args.out if args.resume else None)
    except RunStopped as e:
        print(f"ra train: {e}", file=sys.stderr)
        return 128 + e.signum
    if int(os.environ.get("RANK", "0")) == 0:
        print(dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
