"""Tensor files of a checkpoint: model weights (tied tensors once), optimizer and GradScaler state, RNG states.

All are safetensors (no pickle); their JSON parts live in the safetensors metadata. Loading checks keys, shapes,
dtypes and finiteness against the live model and optimizer and raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from . import atomic
from .errors import CheckpointError, NonFiniteError

FORMAT = "reciprocal_attention.lab.checkpoint/2"
RNG_FILE = "rng.safetensors"


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
