"""Training checkpoints: atomic, complete, verified on load.

Layout (``ROOT`` is usually ``RUN/checkpoints``)::

    ROOT/step_000500/model.safetensors   weights; a tied tensor is stored once (aliases in the metadata)
    ROOT/step_000500/optimizer.pt        optimizer (and GradScaler) state, torch.save, loaded weights_only
    ROOT/step_000500/rng.safetensors     torch CPU and CUDA generator states
    ROOT/step_000500/state.json          step, data position, config, Python/NumPy RNG, sizes + sha256 of the
                                         three files above (written last: its presence marks a complete dir)
    ROOT/latest                          name of the newest complete checkpoint (updated after everything)

Every file is written to a temporary file in its directory, flushed, fsynced, renamed over the target, and the
directory is fsynced. Loading checks every file against ``state.json`` and the model's keys and shapes; it never
re-initialises anything and raises :class:`CheckpointError` naming the file at fault.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "reciprocal_attention.lab.checkpoint/1"
MODEL_FILE, OPTIM_FILE, RNG_FILE, STATE_FILE, LATEST = (
    "model.safetensors", "optimizer.pt", "rng.safetensors", "state.json", "latest")
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or does not belong to this model/optimizer."""


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------

def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it, rename it over ``path``, fsync the dir.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a binary file object and publish the result atomically at ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------------------

def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor states for safetensors, JSON-able states) of torch CPU/CUDA, Python and NumPy global RNGs."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def restore_rng_state(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored for the devices present)."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                       key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], device=i)
    v, state, gauss = js["python"]
    random.setstate((v, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------------------------
# Model weights (tied tensors stored once)
# ----------------------------------------------------------------------------------------------------------------

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State-dict tensors with each shared storage kept once, and ``{alias: stored name}`` for the others."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in unwrap(model).state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def save_model(path: str | os.PathLike, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s weights to a safetensors file atomically (tied tensors once)."""
    tensors, aliases = model_tensors(model)
    meta = {"format": FORMAT, "aliases": json.dumps(aliases), **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_model(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load weights saved by :func:`save_model` into ``model``; exact keys and shapes, else CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a reciprocal_attention checkpoint (format {meta.get('format')!r})")
    aliases = json.loads(meta.get("aliases", "{}"))
    target = unwrap(model)
    expected = target.state_dict()
    missing = sorted(k for k in expected if k not in tensors and k not in aliases)
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{'...' if len(unexpected) > 8 else ''} (a different architecture or attention?)")
    for alias, stored in aliases.items():
        if alias in expected and expected[alias].data_ptr() != expected.get(stored, expected[alias]).data_ptr():
            raise CheckpointError(f"{path}: {alias} was saved tied to {stored}, but they are separate in this model")
    bad = [f"{k}: file {list(v.shape)}/{v.dtype} vs model {list(expected[k].shape)}/{expected[k].dtype}"
           for k, v in tensors.items() if v.shape != expected[k].shape or v.dtype != expected[k].dtype]
    if bad:
        raise CheckpointError(f"{path}: shape/dtype mismatch: " + "; ".join(bad[:8]))
    target.load_state_dict({**tensors, **{a: tensors[s] for a, s in aliases.items() if a in expected}}, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# Full checkpoints
# ----------------------------------------------------------------------------------------------------------------

def step_dir(root: str | os.PathLike, step: int) -> Path:
    """``ROOT/step_NNNNNN``."""
    return Path(root) / f"step_{int(step):06d}"


def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
                    scaler: Any | None = None, keep_last: int = 0) -> Path:
    """Write a complete checkpoint for ``step`` under ``root`` and point ``root/latest`` at it.

    The files go into a hidden ``.step_N.partial-PID`` directory (each written atomically, ``state.json`` last),
    which is then renamed to ``step_N``: a ``step_N`` directory is always complete. An existing complete
    ``step_N`` is never overwritten. ``state`` must be JSON-able (step, data position, config, ...); RNG states
    are added here. Afterwards, step directories beyond the ``keep_last`` newest are deleted (``0`` keeps all).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite a checkpoint")
    for stale in root.glob(".step_*.partial-*"):  # left by a run that died mid-save
        shutil.rmtree(stale, ignore_errors=True)
    d = root / f".{final.name}.partial-{os.getpid()}"
    d.mkdir()
    save_model(d / MODEL_FILE, model, metadata={"step": str(step)})
    opt_state = {"optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "scaler": scaler.state_dict() if scaler is not None else None}
    atomic_write(d / OPTIM_FILE, lambda f: torch.save(opt_state, f))
    rng_tensors, rng_json = capture_rng_state()
    with atomic_path(d / RNG_FILE) as tmp:
        save_file(rng_tensors, str(tmp), metadata={"format": FORMAT})
    files = {name: {"bytes": (d / name).stat().st_size, "sha256": _sha256(d / name)}
             for name in (MODEL_FILE, OPTIM_FILE, RNG_FILE)}
    body = {"format": FORMAT, "step": int(step), "files": files, "rng": rng_json, **state}
    atomic_write_text(d / STATE_FILE, json.dumps(body, indent=1) + "\n")
    os.replace(d, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete step directories under ``root`` (with a ``state.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step directory meant by ``path``: a step dir, a checkpoints root (its ``latest``) or a run dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / STATE_FILE).exists() or _STEP_DIR.fullmatch(path.name):
        return path
    for root in (path, path / "checkpoints"):
        latest = root / LATEST
        if latest.is_file():
            name = latest.read_text(encoding="utf-8").strip()
            if not _STEP_DIR.fullmatch(name):
                raise CheckpointError(f"{latest}: does not name a step directory ({name[:60]!r})")
            return root / name
    raise CheckpointError(f"{path}: no checkpoint here (no {STATE_FILE}, no {LATEST}, no checkpoints/{LATEST})")


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint (``path`` as in :func:`resolve_checkpoint`)."""
    d = resolve_checkpoint(path)
    f = d / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: the checkpoint in {d} is incomplete (the run probably died while "
                              f"writing it); resume from an earlier one")
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a reciprocal_attention checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else None!r})")
    state["dir"] = str(d)
    return state


def verify_files(state: dict[str, Any], full: bool = True) -> None:
    """Check each file listed in ``state`` exists with its recorded size (and sha256 when ``full``)."""
    d = Path(state["dir"])
    for name, info in state["files"].items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, {STATE_FILE} records {info['bytes']} (truncated or replaced)")
        if full and _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 differs from {STATE_FILE} (corrupt)")


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scaler: Any | None = None,
                    restore_rng: bool = True, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``, ``scaler``, the global RNGs); return its state.

    ``verify`` also checks sha256 of every file (sizes are always checked).
    """
    state = read_state(path)
    d = Path(state["dir"])
    verify_files(state, full=verify)
    load_model(d / MODEL_FILE, model)
    if optimizer is not None or scaler is not None:
        try:
            opt_state = torch.load(d / OPTIM_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt pickles/zips
            raise CheckpointError(f"{d / OPTIM_FILE}: cannot be read ({type(e).__name__}: {e})") from None
        if optimizer is not None:
            if opt_state.get("optimizer") is None:
                raise CheckpointError(f"{d / OPTIM_FILE} holds no optimizer state")
            try:
                optimizer.load_state_dict(opt_state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{d / OPTIM_FILE} does not fit this optimizer: {e}") from None
        if scaler is not None:
            if opt_state.get("scaler") is None:
                raise CheckpointError(f"{d / OPTIM_FILE} holds no GradScaler state (saved without float16?)")
            scaler.load_state_dict(opt_state["scaler"])
    if restore_rng:
        try:
            rng_tensors = load_file(str(d / RNG_FILE))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{d / RNG_FILE}: not a readable safetensors file: {e}") from None
        restore_rng_state(rng_tensors, state["rng"])
    return state
