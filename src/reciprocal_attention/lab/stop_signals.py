"""Stop signals for a training run: checkpoint the current step and stop, rather than lose the steps since the
last periodic checkpoint (:class:`StopSignals`, used by :func:`reciprocal_attention.lab.train.train`)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class StopSignals:
    """While active, SIGTERM (a scheduler's stop, ``ra quality --deadline``) and a first Ctrl-C ask the loop to
    checkpoint the step it is on and stop (:class:`RunStopped`), instead of losing the steps since the last
    periodic checkpoint; a second Ctrl-C interrupts at once. Single-process runs in the main thread only: a DDP
    rank cannot stop alone, so a stopped DDP run resumes from its periodic checkpoints."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if signum == signal.SIGINT:  # the next Ctrl-C is a plain KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("%s received: checkpointing the current step, then stopping", signal.Signals(signum).name)

    def __exit__(self, *_exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
