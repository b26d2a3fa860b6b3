"""Training checkpoints: committed by one pointer, complete, finite, and verified on load.

Layout (``ROOT`` is usually ``RUN/checkpoints``)::

    ROOT/step_000500/model.safetensors      weights; a tied tensor is stored once (aliases in the metadata)
    ROOT/step_000500/optimizer.safetensors  optimizer tensors; param groups and GradScaler state in the metadata
    ROOT/step_000500/rng.safetensors        torch CPU and CUDA generator states
    ROOT/step_000500/state.json             step, data position, config, Python/NumPy RNG, size + sha256 of the
                                            three files above, and a sha256 of its own content
    ROOT/latest                             the name of the newest committed checkpoint

``latest`` is the one commit point: a checkpoint is written into a hidden partial directory, renamed to
``step_N``, and exists for readers only once ``latest`` names it. A step directory newer than ``latest`` (a
run killed between the rename and the pointer update) is uncommitted: :func:`repair` removes it and
:func:`save_checkpoint` replaces it. Every file goes through :mod:`.atomic` (no pickle anywhere). Weights or
optimizer state that are not finite are never written, and loading refuses them unless asked. Errors name the
file at fault (:class:`CheckpointError`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .errors import CheckpointError, NonFiniteError
from .runlock import pid_alive
from .tensorio import (FORMAT, RNG_FILE, _read_safetensors, capture_rng_state, first_nonfinite, load_model,
                       load_optimizer, model_tensors, optimizer_tensors, restore_rng_state, save_model, unwrap)

__all__ = ["CheckpointError", "FORMAT", "LATEST", "capture_rng_state", "check_schema", "first_nonfinite",
           "list_checkpoints", "load_checkpoint", "load_model", "load_optimizer", "model_tensors",
           "optimizer_tensors", "read_latest", "read_state", "repair", "resolve_checkpoint", "restore_rng_state",
           "save_checkpoint", "save_model", "step_dir", "unwrap", "verify_files"]
log = logging.getLogger(__name__)
MODEL_FILE, OPTIM_FILE, STATE_FILE, LATEST = ("model.safetensors", "optimizer.safetensors", "state.json", "latest")
DATA_FILES = (MODEL_FILE, OPTIM_FILE, RNG_FILE)
_STEP_DIR = re.compile(r"step_(\d+)")
_PARTIAL = re.compile(r"\.step_\d+\.partial-(\d+)(-[0-9a-f]+)?")
_TRASH = ".trash-"


# ----------------------------------------------------------------------------------------------------------------
# Schema and checksum of state.json
# ----------------------------------------------------------------------------------------------------------------

_NUMBER = (int, float)
STATE_SCHEMA: dict[str, tuple] = {"format": (str,), "step": (int,), "files": (dict,), "rng": (dict,),
                                  "checksum": (str,)}


def check_schema(state: dict[str, Any], schema: dict[str, tuple], where: Path) -> None:
    """Raise :class:`CheckpointError` naming ``where`` unless every ``schema`` key is present with its type."""
    for key, types in schema.items():
        if key not in state:
            raise CheckpointError(f"{where}: missing key {key!r} (an incomplete or hand-edited {STATE_FILE})")
        v = state[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"{where}: {key!r} must be {names}; got {v!r:.60}")


def _checksum(body: dict[str, Any]) -> str:
    import hashlib

    text = atomic.dumps({k: v for k, v in body.items() if k != "checksum"}, nonfinite="raise", sort_keys=True,
                        separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_state(state: Any, f: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else None
        old = " (an older checkpoint format this version does not read)" if isinstance(fmt, str) and \
            fmt.startswith("reciprocal_attention.") else ""
        raise CheckpointError(f"{f}: not a reciprocal_attention checkpoint of format {FORMAT!r} (format {fmt!r}){old}")
    check_schema(state, STATE_SCHEMA, f)
    if state["checksum"] != _checksum(state):
        raise CheckpointError(f"{f}: checksum differs from its content (edited or corrupt)")
    if state["step"] < 0:
        raise CheckpointError(f"{f}: 'step' must be >= 0; got {state['step']}")
    if sorted(state["files"]) != sorted(DATA_FILES):
        raise CheckpointError(f"{f}: 'files' must list {list(DATA_FILES)}; got {sorted(state['files'])}")
    for name, info in state["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"{f}: files[{name!r}] must be {{'bytes': int, 'sha256': str}}; got {info!r:.80}")
    for k in ("python", "numpy"):
        if not isinstance(state["rng"].get(k), list):
            raise CheckpointError(f"{f}: rng[{k!r}] is missing or not a list")


# ----------------------------------------------------------------------------------------------------------------
# The commit protocol: partial dir -> step_N -> latest
# ----------------------------------------------------------------------------------------------------------------

def step_dir(root: str | os.PathLike, step: int) -> Path:
    """``ROOT/step_NNNNNN``."""
    return Path(root) / f"step_{int(step):06d}"


def step_of(path: str | os.PathLike) -> int:
    """The step number of a ``step_N`` directory name."""
    m = _STEP_DIR.fullmatch(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path}: not a step directory (step_NNNNNN)")
    return int(m.group(1))


def is_step_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like a step directory (``step_NNNNNN``)."""
    return _STEP_DIR.fullmatch(Path(path).name) is not None


def read_latest(root: str | os.PathLike) -> str | None:
    """The committed checkpoint's directory name under ``root``, or None when nothing is committed."""
    f = Path(root) / LATEST
    if not f.is_file():
        return None
    name = f.read_text(encoding="utf-8").strip()
    if not _STEP_DIR.fullmatch(name):
        raise CheckpointError(f"{f}: does not name a step directory ({name[:60]!r})")
    return name


def _remove_tree(path: Path) -> None:
    """Delete a directory so that no half-deleted copy is ever seen under its name (rename, then delete)."""
    trash = path.with_name(f"{_TRASH}{path.name}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def repair(root: str | os.PathLike) -> list[str]:
    """Remove what an interrupted writer left under ``root``: partial and half-deleted directories, temporary
    files, and step directories that ``latest`` does not cover (written but never committed). Call it only while
    holding the run's lock. Returns the names removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    latest = read_latest(root)
    limit = step_of(latest) if latest else -1
    gone = [p.name for p in atomic.remove_temp_files(root)]
    for p in sorted(root.iterdir()):
        m = _STEP_DIR.fullmatch(p.name)
        if p.is_dir() and (p.name.startswith(_TRASH) or _PARTIAL.fullmatch(p.name) or (m and int(m.group(1)) > limit)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    if gone:
        atomic.fsync_dir(root)
    return gone


def _clear_stale_partials(root: Path) -> None:
    for p in root.glob(".step_*.partial-*"):
        m = _PARTIAL.fullmatch(p.name)
        if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)


def _check_finite(model: torch.nn.Module, opt_tensors: dict[str, torch.Tensor], final: Path) -> None:
    bad = first_nonfinite(unwrap(model).state_dict().items()) or first_nonfinite(opt_tensors.items())
    if bad is not None:
        raise NonFiniteError(f"refusing to write checkpoint {final}: {bad} holds non-finite values (NaN/inf); "
                             f"the last committed checkpoint is kept")


def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
                    scaler: Any | None = None, keep_last: int = 0) -> Path:
    """Write a complete checkpoint for ``step`` under ``root`` and commit it by pointing ``root/latest`` at it.

    ``state`` must be JSON-able (step, data position, config, ...); RNG states are added here. A committed
    ``step_N`` is never overwritten; an uncommitted one (newer than ``latest``) is replaced. Nothing is written if a
    weight or optimizer tensor is not finite (:class:`NonFiniteError`). After the commit, committed checkpoints
    beyond the ``keep_last`` newest are deleted (``0`` keeps all); the one just written is never deleted.
    """
    root = Path(root)
    final = step_dir(root, step)
    opt_tensors, opt_meta = optimizer_tensors(optimizer, scaler)
    _check_finite(model, opt_tensors, final)
    root.mkdir(parents=True, exist_ok=True)
    latest = read_latest(root)
    if final.exists():
        if latest is not None and step <= step_of(latest):
            raise CheckpointError(f"{final} already exists and is committed; refusing to overwrite a checkpoint")
        log.info("replacing %s: it was written but never committed (no %s names it)", final, LATEST)
        _remove_tree(final)
    _clear_stale_partials(root)
    d = root / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        files = {MODEL_FILE: save_model(d / MODEL_FILE, model, metadata={"step": str(step)})}
        files[OPTIM_FILE] = atomic.write_safetensors(d / OPTIM_FILE, opt_tensors, metadata=opt_meta)
        rng_tensors, rng_json = capture_rng_state()
        files[RNG_FILE] = atomic.write_safetensors(d / RNG_FILE, rng_tensors, metadata={"format": FORMAT})
        body = {**state, "format": FORMAT, "step": int(step), "rng": rng_json,
                "files": {n: {"bytes": w.bytes, "sha256": w.sha256} for n, w in files.items()}}
        body["checksum"] = _checksum(body)
        atomic.write_text(d / STATE_FILE, atomic.dumps(body, nonfinite="raise", indent=1) + "\n")
        os.replace(d, final)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    atomic.fsync_dir(root)
    atomic.write_text(root / LATEST, final.name + "\n")  # the commit point
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                _remove_tree(old)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Committed step directories under ``root`` (complete, not newer than ``latest``), oldest first."""
    root = Path(root)
    latest = read_latest(root) if root.is_dir() else None
    if latest is None:
        return []
    limit = step_of(latest)
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name) and step_of(p) <= limit
            and (p / STATE_FILE).is_file()]
    return sorted(dirs, key=step_of)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The step directory meant by ``path``: a step dir, a checkpoints root (its ``latest``) or a run dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / STATE_FILE).exists() or _STEP_DIR.fullmatch(path.name):
        return path
    for root in (path, path / "checkpoints"):
        name = read_latest(root)
        if name is not None:
            return root / name
    raise CheckpointError(f"{path}: no committed checkpoint here (no {STATE_FILE}, no {LATEST}, "
                          f"no checkpoints/{LATEST})")


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``state.json`` of a checkpoint (``path`` as in :func:`resolve_checkpoint`), with ``dir``."""
    d = resolve_checkpoint(path)
    f = d / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: the checkpoint in {d} is incomplete (the run probably died while "
                              f"writing it); resume from an earlier one")
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    _check_state(state, f)
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
        if full and atomic.sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 differs from {STATE_FILE} (corrupt)")


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scaler: Any | None = None,
                    restore_rng: bool = True, verify: bool = True, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``, ``scaler``, the global RNGs); return its state.

    ``verify`` also checks sha256 of every file (sizes are always checked). Non-finite weights or optimizer
    state raise :class:`CheckpointError` unless ``allow_nonfinite``.
    """
    state = read_state(path)
    d = Path(state["dir"])
    verify_files(state, full=verify)
    load_model(d / MODEL_FILE, model, allow_nonfinite=allow_nonfinite)
    if optimizer is not None or scaler is not None:
        load_optimizer(d / OPTIM_FILE, optimizer, scaler, model, allow_nonfinite=allow_nonfinite)
    if restore_rng:
        tensors, _ = _read_safetensors(d / RNG_FILE)
        restore_rng_state(tensors, state["rng"], where=str(d / RNG_FILE))
    return state
