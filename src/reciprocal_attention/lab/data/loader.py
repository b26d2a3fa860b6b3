"""Reading a prepared corpus: the manifest, each split as a read-only ``uint16`` memmap checked when it is opened,
and batches drawn from it as a pure function of ``(seed, rank, index)`` (so a resumed run sees the same batches).

    train = load_split("data/corpus", "train", block_size=1024)   # checked against the manifest and the vocab
    x, y = get_batch(train, batch_size=8, block_size=1024, seed=0, index=step)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..atomic import sha256_file
from .layout import DTYPE, FORMAT, MANIFEST, SPLITS, CorpusError, CorpusNotFoundError, DataError, rebuild_hint


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared corpus; a :class:`CorpusError` naming the file if it is missing or not ours."""
    root = Path(data_dir)
    if not root.is_dir():
        raise CorpusNotFoundError(f"data directory {data_dir} does not exist; build a corpus there with "
                                  f"`ra data prepare --out {data_dir}`")
    path = root / MANIFEST
    if not path.is_file():
        raise CorpusNotFoundError(f"{path} not found: {data_dir} is not a prepared corpus; build it with "
                                  f"`ra data prepare --out {data_dir}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path} is not valid JSON ({e}); {rebuild_hint(data_dir)}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT!r}")
    tok = manifest.get("tokenizer")
    if not (isinstance(tok, dict) and isinstance(tok.get("n_vocab"), int) and tok["n_vocab"] > 0
            and isinstance(manifest.get("splits"), dict)):
        raise CorpusError(f"{path}: needs a 'tokenizer' with a positive int 'n_vocab' and a 'splits' table; "
                          f"{rebuild_hint(data_dir)}")
    return manifest


def _split_entry(manifest: dict, data_dir: str | os.PathLike, split: str) -> dict:
    entry = manifest["splits"].get(split)
    where = Path(data_dir) / MANIFEST
    if entry is None:
        raise CorpusError(f"{where} has no entry for split {split!r}; {rebuild_hint(data_dir)}")
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("tokens"), int)
            and entry["tokens"] >= 0 and isinstance(entry.get("sha256"), str)):
        raise CorpusError(f"{where}: split {split!r} needs 'file' (str), 'tokens' (int >= 0) and 'sha256' (str); "
                          f"got {entry!r}")
    return entry


def _check_size(path: Path, data_dir: str | os.PathLike, split: str, tokens: int) -> None:
    size, itemsize = path.stat().st_size, np.dtype(DTYPE).itemsize
    if size == 0:
        raise CorpusError(f"{path.name} in {data_dir} is empty; {rebuild_hint(data_dir)}")
    if size % itemsize:
        raise CorpusError(f"{path} (split {split!r}) has {size} bytes, not a whole number of {itemsize}-byte "
                          f"tokens: truncated; {rebuild_hint(data_dir)}")
    if size != tokens * itemsize:
        raise CorpusError(f"{path} (split {split!r}) has {size} bytes but {MANIFEST} says {tokens} tokens = "
                          f"{tokens * itemsize} bytes: truncated or replaced; {rebuild_hint(data_dir)}")


def load_split(data_dir: str | os.PathLike, split: str, verify: bool = False, *, vocab_size: int | None = None,
               block_size: int | None = None) -> np.memmap:
    """The ``split`` tokens of a prepared corpus as a read-only ``uint16`` memmap, checked at open.

    Checks: the file exists, is not empty, holds whole tokens, matches the manifest's size (and sha256 with
    ``verify=True``); every id is below the tokenizer's vocabulary (and ``vocab_size``, the model's, when given;
    one pass over the memmap); with ``block_size``, there are enough tokens for one ``block_size + 1`` window.
    Raises :class:`CorpusError` naming the file and split otherwise. Never substitutes anything.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}; got {split!r}")
    manifest = load_manifest(data_dir)
    entry = _split_entry(manifest, data_dir, split)
    path = Path(data_dir) / entry["file"]
    if not path.is_file():
        raise CorpusNotFoundError(f"{path} (split {split!r}) is missing (listed in {MANIFEST}); "
                                  f"{rebuild_hint(data_dir)}")
    _check_size(path, data_dir, split, entry["tokens"])
    if verify:
        got = sha256_file(path)
        if got != entry["sha256"]:
            raise CorpusError(f"{path}: sha256 {got} != {entry['sha256']} in {MANIFEST}: corrupt; "
                              f"{rebuild_hint(data_dir)}")
    data = np.memmap(path, dtype=DTYPE, mode="r")
    tok = manifest["tokenizer"]
    limit = min(tok["n_vocab"], vocab_size) if vocab_size is not None else tok["n_vocab"]
    top = int(data.max())
    if top >= limit:
        whose = (f"the model's vocab_size {vocab_size}" if vocab_size is not None and vocab_size < tok["n_vocab"]
                 else f"the vocabulary size {tok['n_vocab']} of tokenizer {tok.get('name')!r}")
        raise CorpusError(f"{path} (split {split!r}) holds token id {top} >= {whose}: corrupt or built with another "
                          f"tokenizer; {rebuild_hint(data_dir)}")
    if block_size is not None:
        check_length(data, block_size)
    return data


def _describe(data: np.ndarray) -> str:
    """``split 'train' (/path/train.bin)`` for a split memmap, ``the split`` for any other array."""
    name = getattr(data, "filename", None)
    return f"split {Path(name).stem!r} ({name})" if name else "the split"


def check_length(data: np.ndarray, block_size: int) -> None:
    """Raise :class:`CorpusError` (naming split and file) unless ``data`` holds a ``block_size + 1`` window
    with room to move (``block_size + 2`` tokens)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    if len(data) < block_size + 2:
        raise CorpusError(f"{_describe(data)} has {len(data)} tokens, too few for block_size={block_size} (needs "
                          f">= block_size + 2); use a smaller block_size or a larger corpus")


def batch_offsets(n_tokens: int, batch_size: int, block_size: int, seed: int, index: int,
                  rank: int = 0) -> np.ndarray:
    """Start offsets of batch number ``index``: a pure function of ``(seed, rank, index)`` (resume-exact)."""
    for name, v in (("batch_size", batch_size), ("block_size", block_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if n_tokens < block_size + 2:
        raise ValueError(f"the split has {n_tokens} tokens, too few for block_size={block_size} (needs "
                         f">= block_size + 2)")
    rng = np.random.default_rng([int(seed), int(rank), int(index)])
    return rng.integers(0, n_tokens - block_size - 1, size=batch_size, endpoint=True)


def get_batch(data: np.ndarray, batch_size: int, block_size: int, seed: int, index: int, rank: int = 0,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of stream ``(seed, rank)``: ``x, y`` int64 ``[batch_size, block_size]``, y = x shifted by 1."""
    check_length(data, block_size)
    ix = batch_offsets(len(data), batch_size, block_size, seed, index, rank)
    chunk = np.stack([np.asarray(data[i:i + block_size + 1], dtype=np.int64) for i in ix])
    x, y = torch.from_numpy(chunk[:, :-1].copy()), torch.from_numpy(chunk[:, 1:].copy())
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
