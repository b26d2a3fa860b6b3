"""The lab's user-error family: anything the user can fix (a config, a path, a run directory).

The CLI prints a :class:`UserError` as one line, ``ra: error: <message>``, and exits 2; any other exception is a bug
and keeps its traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UserError(Exception):
    """An error caused by the user's input (config, paths, files, concurrent use), explained in one line."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value or key (the message names the key and the expected form)."""


class CheckpointError(UserError):
    """A checkpoint or run directory that cannot be used as asked (the message names the file)."""


class RunLockedError(UserError):
    """The run directory is held by another live process (the message names the holder)."""


class DiskFullError(UserError, OSError):
    """A write failed for lack of space or an I/O error (the message names the file, bytes needed and free)."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient norm, or a checkpoint holds non-finite values."""


class RunStopped(Exception):
    """A stop signal (SIGTERM, or a first Ctrl-C) ended training early, right after a checkpoint of the step it
    reached: the run resumes there (``ra train --resume DIR``). Not an error of the user's: ``ra train`` says so in
    one line and exits with 128 + the signal's number (143 for SIGTERM), as a process the signal ended would."""

    def __init__(self, signum: int, step: int, out: str) -> None:
        import signal

        self.signum, self.step, self.out = signum, step, out
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is in "
                         f"{out}/checkpoints; continue with `ra train --resume {out}`")


def read_user_json(path: str | Path, what: str) -> Any:
    """The JSON file the user named, ``what`` saying where and what it must be (e.g. ``"--restore: a quality.json"``);
    a missing or unreadable file is a :class:`UserError` naming the file and ``what``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; expected {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable as {what} ({e})") from None
