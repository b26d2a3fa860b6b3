"""Where a training run executes: the process group, the device, the precision, and per-rank RNG streams."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as torch_dist

from .errors import ConfigError, UserError

R = TypeVar("R")

# Dense peak FLOP/s per device: (bf16/fp16 tensor core, tf32).
PEAK_FLOPS = {"H200": (989e12, 494.5e12), "H100 PCIe": (756e12, 378e12), "H100": (989e12, 494.5e12),
              "A100": (312e12, 156e12), "L40S": (362e12, 183e12), "A10G": (125e12, 62.5e12)}


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

    def barrier(self) -> None:
        """Wait for every rank (a no-op for one process)."""
        if self.enabled:
            torch_dist.barrier()

    def on_master(self, fn: Callable[[], R], what: str) -> R | None:
        """Run ``fn`` on rank 0 while the other ranks wait, then let every rank know how it went: where rank 0
        failed, every rank raises (none is left waiting at a barrier for a rank that has gone). Rank 0 raises its
        own exception; the others raise a :class:`UserError` (rank 0's was a user error) or ``RuntimeError``
        naming ``what`` and rank 0's message. Returns ``fn()``'s result on rank 0, None elsewhere."""
        result, error = None, None
        if self.master:
            try:
                result = fn()
            except BaseException as e:  # every rank must hear of it, whatever it is
                error = e
        if self.enabled:
            news = [None if error is None else (isinstance(error, UserError), f"{type(error).__name__}: {error}")]
            torch_dist.broadcast_object_list(news, src=0)
            if news[0] is not None and not self.master:
                user, message = news[0]
                raise (UserError if user else RuntimeError)(f"rank 0 failed while {what}: {message}")
        if error is not None:
            raise error
        return result


def visible_gpus() -> list[str]:
    """The GPU ids a child process can be pinned to with ``CUDA_VISIBLE_DEVICES``: this process's own
    ``CUDA_VISIBLE_DEVICES`` entries, else ``0 .. n-1`` for the ``n`` GPUs torch sees; ``[]`` without CUDA."""
    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in env.split(",") if s.strip()] if env else [str(i) for i in range(n)]
    return ids[:n]


def pinned_env(gpu: str | None) -> dict[str, str]:
    """The environment of a child job: this one's, unbuffered, and pinned to ``gpu`` when given (a study's jobs are
    spread over a machine's GPUs; several on one GPU only take turns on it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


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
            raise ConfigError(f"system.device={pref!r} but CUDA is not available (use cpu or auto)")
        return torch.device("cuda", dist.local_rank if dist.enabled or pref == "cuda" else int(pref.split(":")[1]))
    return torch.device(pref)


def pick_dtype(pref: str, device: torch.device) -> torch.dtype:
    """``system.dtype`` resolved (``auto``: bfloat16 on CUDA with bf16 support, else float32)."""
    if pref == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[pref]


def device_name(device: torch.device) -> str:
    """The card's name for a CUDA device (e.g. ``NVIDIA H100 80GB HBM3``), else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops(device: torch.device, dtype: torch.dtype, override: float) -> float | None:
    """Per-device dense peak FLOP/s for MFU, or None when unknown (then MFU is not reported)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, (half, tf32) in PEAK_FLOPS.items():
        if key in name:
            return tf32 if dtype == torch.float32 else half
    return None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_rank_rng(device: torch.device, dist: Dist) -> list | None:
    """Every rank's torch RNG states (CPU, and its CUDA device), gathered on all ranks; None if not distributed."""
    if not dist.enabled:
        return None
    mine = [torch.get_rng_state().tolist(),
            torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else None]
    everyone: list = [None] * dist.world_size
    torch_dist.all_gather_object(everyone, mine)
    return everyone


def restore_rank_rng(states: list, device: torch.device) -> None:
    """Restore one rank's torch RNG states as :func:`gather_rank_rng` recorded them."""
    torch.set_rng_state(torch.tensor(states[0], dtype=torch.uint8))
    if states[1] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(states[1], dtype=torch.uint8), device)
