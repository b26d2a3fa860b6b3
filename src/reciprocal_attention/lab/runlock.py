"""One writer per run directory: ``RUN/.lock`` holds the writer's pid and host, created with ``O_EXCL``.

A second process that wants the same run gets a :class:`RunLockedError` naming the holder. A lock left by a
process that no longer exists on this host (killed, crashed) is stale: it is taken over, with a log message. A
lock from another host cannot be checked and is never taken over; the message says how to remove it.

    with RunLock(run_dir):
        ...  # write checkpoints, metrics, ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import RunLockedError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or foreign: a writer died between create and write, or someone else's file
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"


class RunLock:
    """An exclusive lock on a run directory (a context manager; :meth:`acquire` / :meth:`release` also work)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self._token = uuid.uuid4().hex

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        body = {"pid": os.getpid(), "host": socket.gethostname(), "token": self._token,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(body) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        return pid != os.getpid() and not pid_alive(pid)

    def _take_over(self, holder: dict[str, Any]) -> bool:
        """Move a stale lock aside; False if what was moved turned out to be another process's fresh lock."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{self._token[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return True  # someone else removed it; race for O_EXCL again
        moved = _read(aside) or {}
        if moved.get("token") != holder.get("token") or moved.get("pid") != holder.get("pid"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # a live lock was moved: put it back
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        log.warning("taking over the stale lock %s of %s: that process no longer exists", self.path,
                    _describe(holder))
        return True

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLockedError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                return self
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile
            if not holder:  # empty or unreadable: a creator may be writing it right now
                time.sleep(0.2)
                holder = _read(self.path)
                if holder is None:
                    continue
                if not holder:
                    raise RunLockedError(f"{self.path} exists but is not a readable lock; if no process uses "
                                         f"{self.path.parent}, delete it")
            if self._is_stale(holder) and self._take_over(holder):
                continue
            hint = ("; if that process is gone, delete the lock file" if holder.get("host") != socket.gethostname()
                    else "")
            raise RunLockedError(f"{self.path.parent} is in use by {_describe(holder)} (lock file {self.path})"
                                 f"{hint}")
        raise RunLockedError(f"could not lock {self.path.parent}: the lock {self.path} keeps changing hands")

    def release(self) -> None:
        """Remove the lock if this object holds it (and it is still ours)."""
        if not self.held:
            return
        self.held = False
        holder = _read(self.path) or {}
        if holder.get("token") == self._token:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("%s no longer holds this process's token; leaving it", self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
