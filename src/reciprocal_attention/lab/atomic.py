"""The lab's one atomic file writer: a file is either absent, its old version, or completely written.

Every write goes to a temporary file next to the target, is flushed and fsynced, renamed over the target
(``os.replace``), and the directory is fsynced so the rename survives a crash. The sha256 and size of what was
written are returned. A failed write (a full disk, an I/O error, an exception in the caller's writer) removes the
temporary file, leaves the target untouched, and for space and I/O errors raises :class:`DiskFullError` naming the
file, the bytes needed and the bytes free.

    info = write_bytes(path, data)                  # -> Written(path, bytes, sha256)
    write_json(path, obj)                           # strict JSON: NaN/inf become null (or raise)
    write_safetensors(path, tensors, metadata)
    with atomic_path(path, size_hint=n) as tmp:     # any writer that takes a file name
        fig.savefig(tmp)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from .errors import DiskFullError

# errnos that mean "the storage cannot take this write" rather than a programming error
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
TMP_MARK = ".tmp-"


@dataclass(frozen=True)
class Written:
    """What an atomic write produced."""

    path: Path
    bytes: int
    sha256: str


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free on the filesystem holding ``path`` (its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _space_error(path: Path, needed: int | None, cause: BaseException) -> DiskFullError:
    need = f"{needed:,} bytes needed" if needed is not None else "size unknown"
    why = getattr(cause, "strerror", None) or str(cause).splitlines()[0][:200]
    return DiskFullError(f"cannot write {path}: {why} ({need}, {free_bytes(path.parent):,} bytes free); "
                         f"the previous version of the file, if any, is intact")


def _is_space_error(e: BaseException, path: Path, needed: int | None) -> bool:
    if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
        return True
    # writers in native code (safetensors, torch) report a full disk as their own exception types
    text = str(e).lower()
    if "no space left" in text or "disk quota" in text or "file too large" in text:
        return True
    return needed is not None and free_bytes(path.parent) < needed


def temp_name(path: Path) -> Path:
    """A unique temporary name next to ``path`` (hidden, marked so a clean-up can find it)."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success publish it at ``path`` atomically.

    ``size_hint``: the bytes the write needs, checked against the free space first and named in a
    :class:`DiskFullError`. On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    if size_hint is not None and free_bytes(path.parent) < size_hint:
        raise _space_error(path, size_hint, OSError(errno.ENOSPC, "not enough free space"))
    tmp = temp_name(path)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if not isinstance(e, DiskFullError) and isinstance(e, Exception) and _is_space_error(e, path, size_hint):
                raise _space_error(path, size_hint, e) from e
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def write_stream(path: str | os.PathLike, write: Callable[[IO[bytes]], None],
                 size_hint: int | None = None) -> Written:
    """Call ``write(f)`` on a binary file object and publish the result atomically at ``path``."""
    path = Path(path)
    with atomic_path(path, size_hint) as tmp:
        with open(tmp, "wb") as f:
            write(f)
        digest, size = sha256_file(tmp), tmp.stat().st_size
    return Written(path, size, digest)


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Written:
    """Write ``data`` to ``path`` atomically."""
    view = memoryview(data)
    return write_stream(path, lambda f: f.write(view), size_hint=view.nbytes)


def write_text(path: str | os.PathLike, text: str) -> Written:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, recursively (for strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps(obj: Any, nonfinite: str = "null", **kw: Any) -> str:
    """Strict JSON text (never a bare NaN/Infinity). ``nonfinite``: ``"null"`` maps them to null, ``"raise"``
    raises ValueError."""
    if nonfinite not in ("null", "raise"):
        raise ValueError(f"nonfinite must be 'null' or 'raise'; got {nonfinite!r}")
    return json.dumps(finite_or_null(obj) if nonfinite == "null" else obj, allow_nan=False, **kw)


def write_json(path: str | os.PathLike, obj: Any, nonfinite: str = "null", indent: int | None = 2) -> Written:
    """Write ``obj`` as strict JSON (plus a newline) atomically."""
    return write_text(path, dumps(obj, nonfinite=nonfinite, indent=indent) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Written:
    """Write CPU tensors to a safetensors file atomically (no pickle)."""
    from safetensors.torch import save_file

    path = Path(path)
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + 4096 + \
        sum(len(k) + len(v) for k, v in (metadata or {}).items())
    with atomic_path(path, size_hint=need) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        digest, size = sha256_file(tmp), tmp.stat().st_size
    return Written(path, size, digest)


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files an interrupted writer left in ``directory``; return them."""
    d = Path(directory)
    if not d.is_dir():
        return []
    gone = [p for p in d.iterdir() if p.name.startswith(".") and TMP_MARK in p.name and p.is_file()]
    for p in gone:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return gone
