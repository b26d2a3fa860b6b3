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
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from . import atomic
from .errors import CheckpointError, NonFiniteError
from .runlock import pid_alive

log = logging.getLogger(__name__)
FORMAT = "reciprocal_attention.lab.checkpoint/2"
MODEL_FILE, OPTIM_FILE, RNG_FILE, STATE_FILE, LATEST = (
    "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "latest")
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


def restore_rng_state(tensors: dict[str, torch.Tensor], js: dict[str, Any], where: str = RNG_FILE) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored for the devices present)."""
    if "torch_cpu" not in tensors:
        raise CheckpointError(f"{where}: no 'torch_cpu' generator state (has {sorted(tensors)})")
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                           key=lambda k: int(k.rsplit("_", 1)[1]))]
        if cuda and torch.cuda.is_available():
            for i in range(min(len(cuda), torch.cuda.device_count())):
                torch.cuda.set_rng_state(cuda[i], device=i)
        v, state, gauss = js["python"]
        random.setstate((v, tuple(state), gauss))
        kind, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{where}: the RNG state cannot be restored ({e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Tensors: finiteness, model weights (tied tensors stored once), optimizer state
# ----------------------------------------------------------------------------------------------------------------

def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor holding a NaN or an infinity, or None."""
    for name, t in tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


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


def save_model(path: str | os.PathLike, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> atomic.Written:
    """Write ``model``'s weights to a safetensors file atomically (tied tensors once); refuse non-finite ones."""
    tensors, aliases = model_tensors(model)
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise NonFiniteError(f"refusing to write {path}: {bad} holds non-finite values")
    meta = {"format": FORMAT, "aliases": json.dumps(aliases), **(metadata or {})}
    return atomic.write_safetensors(path, tensors, metadata=meta)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a reciprocal_attention checkpoint file (format {meta.get('format')!r})")
    return tensors, meta


def _meta_json(meta: dict[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        raise CheckpointError(f"{path}: metadata has no {key!r}")
    try:
        return json.loads(meta[key])
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata {key!r} is not JSON ({e})") from None


def load_model(path: str | os.PathLike, model: torch.nn.Module, allow_nonfinite: bool = False) -> None:
    """Load weights saved by :func:`save_model` into ``model``; exact keys, shapes and finite values."""
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    aliases = _meta_json(meta, "aliases", path) if "aliases" in meta else {}
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
    name = None if allow_nonfinite else first_nonfinite(tensors.items())
    if name is not None:
        raise CheckpointError(f"{path}: {name} holds non-finite values (NaN/inf); pass allow_nonfinite=True to "
                              f"load it anyway")
    target.load_state_dict({**tensors, **{a: tensors[s] for a, s in aliases.items() if a in expected}}, strict=True)


def optimizer_tensors(optimizer: torch.optim.Optimizer | None, scaler: Any | None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The optimizer and GradScaler state as safetensors tensors (``state.<param>.<key>``) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "scaler": atomic.dumps(scaler.state_dict() if scaler is not None else None,
                                                     nonfinite="raise")}
    if optimizer is None:
        meta["optimizer"] = "null"
        return tensors, meta
    sd = optimizer.state_dict()
    plain: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        plain[str(idx)] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                plain[str(idx)][k] = v
    groups = []
    for g in sd["param_groups"]:
        if any(isinstance(v, torch.Tensor) for v in g.values()):
            raise TypeError(f"optimizer param groups must hold plain values to be saved; got tensors in "
                            f"{[k for k, v in g.items() if isinstance(v, torch.Tensor)]}")
        groups.append({k: list(v) if isinstance(v, tuple) else v for k, v in g.items()})
    meta["optimizer"] = atomic.dumps({"param_groups": groups, "plain_state": plain}, nonfinite="raise")
    return tensors, meta


def _group_values(saved: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """A saved param group with tuples restored where the live group has them (JSON has only lists)."""
    return {k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v for k, v in saved.items()}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], body: dict[str, Any],
                          optimizer: torch.optim.Optimizer, names: dict[int, str], path: Path) -> dict[str, Any]:
    """Rebuild a state dict and check it against ``optimizer``'s parameters (count, shapes, dtypes)."""
    live_groups = optimizer.param_groups
    saved_groups = body.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(live_groups):
        raise CheckpointError(f"{path}: {len(saved_groups or [])} param groups saved, the optimizer has "
                              f"{len(live_groups)}")
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise CheckpointError(f"{path}: unexpected tensor {key!r}")
        state.setdefault(int(parts[1]), {})[parts[2]] = t
    for idx, extra in (body.get("plain_state") or {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups, index = [], 0
    for gi, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        ids = saved.get("params")
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            raise CheckpointError(f"{path}: param group {gi} has {len(ids or [])} parameters saved, the optimizer "
                                  f"has {len(live['params'])} (a different model or optimizer?)")
        for pid, p in zip(ids, live["params"]):
            for k, t in state.get(pid, {}).items():
                if isinstance(t, torch.Tensor) and t.dim() and (t.shape != p.shape or t.dtype != p.dtype):
                    raise CheckpointError(f"{path}: optimizer {k} of {names.get(id(p), f'parameter {index}')} is "
                                          f"{list(t.shape)}/{t.dtype}, the parameter is {list(p.shape)}/{p.dtype}")
            index += 1
        groups.append(_group_values(saved, live))
    return {"state": state, "param_groups": groups}


def load_optimizer(path: str | os.PathLike, optimizer: torch.optim.Optimizer | None, scaler: Any | None,
                   model: torch.nn.Module | None = None, allow_nonfinite: bool = False) -> None:
    """Load what :func:`optimizer_tensors` saved into ``optimizer`` and ``scaler`` (``model`` names parameters)."""
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    if optimizer is not None:
        body = _meta_json(meta, "optimizer", path)
        if not isinstance(body, dict):
            raise CheckpointError(f"{path} holds no optimizer state")
        names = {id(p): n for n, p in unwrap(model).named_parameters()} if model is not None else {}
        sd = _optimizer_state_dict(tensors, body, optimizer, names, path)
        bad = None if allow_nonfinite else first_nonfinite(tensors.items())
        if bad is not None:
            raise CheckpointError(f"{path}: {bad} holds non-finite values; pass allow_nonfinite=True to load it")
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{path} does not fit this optimizer: {e}") from None
    if scaler is not None:
        sc = _meta_json(meta, "scaler", path)
        if not isinstance(sc, dict):
            raise CheckpointError(f"{path} holds no GradScaler state (saved without float16?)")
        scaler.load_state_dict(sc)


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
