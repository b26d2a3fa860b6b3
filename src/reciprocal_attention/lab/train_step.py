"""One optimizer step of :func:`reciprocal_attention.lab.train.train`: the step's micro-batches, forward and
backward (DDP-aware gradient accumulation), the gradient norm (clipped or measured), the non-finite guard that
skips or stops before the weights change, and the update.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from .data import get_batch
from .errors import NonFiniteError
from .runtime import sync
from .train_setup import Progress, Run, lr_at

log = logging.getLogger("reciprocal_attention.lab.train")  # one logger for the training run's messages


@dataclass
class StepResult:
    """One optimizer step's outcome (tensors stay on the device until logged)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    lr: float
    seconds: float
    skipped: bool


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


def _grad_norm(run: Run) -> torch.Tensor:
    """The global gradient norm: clipped to ``optim.grad_clip`` when set, else only measured (for the guard)."""
    params = run.raw_model.parameters()
    if run.cfg.optim.grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, run.cfg.optim.grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def nonfinite_guard(run: Run, prog: Progress, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    """True when this step's update must be skipped: a non-finite loss, or gradient norm (except under a float16
    GradScaler, which skips such steps itself). Raises :class:`NonFiniteError` naming the step and values when
    ``train.on_nonfinite`` is ``stop`` or the skips are used up. The weights are not yet updated either way."""
    vals = [loss.float()] + ([grad_norm.float()] if grad_norm is not None and run.scaler is None else [])
    bad = (~torch.isfinite(torch.stack(vals))).any().float()
    if run.dist.enabled:  # every rank takes the same branch
        torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)
    if not bad.item():
        return False
    step = prog.step + 1
    gn = float(grad_norm) if grad_norm is not None else None
    policy, limit = run.cfg.train.on_nonfinite, run.cfg.train.max_skips
    stop = policy == "stop" or prog.skipped >= limit
    run.metrics.write({"kind": "nonfinite", "step": step, "tokens": prog.tokens, "loss": float(loss),
                       "loss_text": str(float(loss)), "grad_norm": gn, "action": "stop" if stop else "skip"})
    what = f"loss {float(loss)}" + (f", gradient norm {gn}" if gn is not None else "")
    if not stop:
        log.warning("step %d: non-finite %s; skipping the update (%d of train.max_skips=%d)", step, what,
                    prog.skipped + 1, limit)
        return True
    why = ("train.on_nonfinite='stop'" if policy == "stop" else f"more than train.max_skips={limit} skipped steps")
    raise NonFiniteError(f"step {step}: non-finite {what}; training stopped ({why}) before updating the weights; "
                         f"the last committed checkpoint is {run.last_ckpt or 'none'}. Lower optim.lr or set "
                         f"optim.grad_clip, then resume or restart")


def train_step(run: Run, prog: Progress) -> StepResult:
    """One optimizer step: LR, micro-batches, forward/backward, clip, guard, update; advances ``prog``."""
    t0 = time.perf_counter()
    cfg, dist = run.cfg, run.dist
    lr = lr_at(prog.step, cfg, run.decay_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # One global sequence of micro-batches: step s uses numbers data_pos .. data_pos + N*A - 1, rank r the
    # r-th run of A of them. So the samples of a step depend only on the global batch, not on how it is split
    # over processes (N GPUs == 1 GPU with grad_accum x N; a resume on another N continues the same data),
    # and a single process draws exactly what it always did.
    A = cfg.data.grad_accum
    batches = [get_batch(run.train_data, cfg.data.batch_size, run.mcfg.block_size, seed=cfg.data.seed,
                         index=prog.data_pos + dist.rank * A + micro, device=run.device) for micro in range(A)]
    prog.data_pos += A * dist.world_size
    loss = accumulate_gradients(run.model, batches, run.autocast, run.scaler)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grad_norm = _grad_norm(run)
    skipped = nonfinite_guard(run, prog, loss, grad_norm)
    if skipped:
        prog.skipped += 1
        if run.scaler is not None:
            run.scaler.update()  # backs the scale off, as for an overflow
    elif run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    prog.step += 1
    prog.tokens += run.tokens_per_step
    if prog.step % cfg.system.log_interval == 0:
        sync(run.device)
    dt = time.perf_counter() - t0
    prog.train_seconds += dt
    return StepResult(loss, grad_norm, lr, dt, skipped)
