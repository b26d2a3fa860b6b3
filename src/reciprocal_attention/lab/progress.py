"""Live progress: of one loop in this process (:class:`LiveProgress`, the MQAR runs and grid), and of training
runs that write ``metrics.jsonl`` (:class:`RunProgress`, the quality study's subprocess runs: one tqdm bar per run on
a terminal with step, train loss, last validation loss and ETA, a line per tenth of its steps otherwise)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

__all__ = ["LiveProgress", "RunProgress"]

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| {n}/{total} steps [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
LINE_FORMAT = "{desc}: {n}/{total} steps [{elapsed}<{remaining}, {rate_fmt}]{postfix}"

def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` so far (a line being written, not yet whole, is skipped)."""
    out = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
    return out


def _total_steps(run: Path, tokens_per_step: int | None) -> int | None:
    """The steps a run's step and token budgets allow, from the config its launch wrote (``requested.toml``, or
    ``config.toml`` once training started); None while neither exists or with only a wall-clock budget."""
    for name in ("requested.toml", "config.toml"):
        with contextlib.suppress(OSError, ValueError):
            budget = tomllib.loads((run / name).read_text()).get("budget", {})
            limits = [budget["max_steps"]] if budget.get("max_steps") else []
            if budget.get("max_tokens") and tokens_per_step:
                limits.append(math.ceil(budget["max_tokens"] / tokens_per_step))
            return min(limits) if limits else None
    return None


class RunProgress:
    """Progress of training runs ``{(arm, seed): run directory}``, read from their ``metrics.jsonl`` files (the runs
    are subprocesses). On a terminal: one tqdm bar per run with step, train loss, last validation loss and ETA.
    Otherwise: a line per run every tenth of its steps, and one when it ends. The study's own lines are routed
    around the bars while they are shown."""

    def __init__(self, runs: dict[tuple[str, int], Path], tty: bool | None = None, interval: float = 1.0) -> None:
        self.runs, self.interval = runs, interval
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bars: dict[tuple[str, int], Any] = {}
        self.state: dict[tuple[str, int], dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ra-compare-progress", daemon=True)
        self._redirect = contextlib.ExitStack()

    def __enter__(self) -> "RunProgress":
        if self.tty:
            self._redirect.enter_context(contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the final state of every run
        for bar in self.bars.values():
            bar.close()
        self._redirect.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Read every started run's metrics and update its bar (or print its line)."""
        for key, d in self.runs.items():
            if d.is_dir():
                self._update(key, d)

    def _update(self, key: tuple[str, int], d: Path) -> None:
        st = self.state.setdefault(key, {"t0": time.time(), "step": 0, "printed": -1, "done": False})
        if st["done"]:
            return
        recs = _read_metrics(d / "metrics.jsonl")
        train = [r for r in recs if r.get("kind") == "train"]
        evals = [r for r in recs if r.get("kind") == "eval" and r.get("loss") is not None]
        # tokens per step from the newest record past step 0 (an eval counts: short runs may log no train record)
        paced = [r for r in recs if r.get("step") and r.get("tokens")]
        tps = paced[-1]["tokens"] // paced[-1]["step"] if paced else None
        st["total"] = _total_steps(d, tps)
        post = {}
        if train and train[-1].get("loss") is not None:
            post["loss"] = f"{train[-1]['loss']:.3f}"
        if evals:
            post["val"] = f"{evals[-1]['loss']:.3f}"
        step = max([r["step"] for r in recs] + [0])
        st["done"] = (d / "summary.json").exists()
        desc = f"[quality] {key[0]} seed {key[1]}"
        if self.tty:
            bar = self.bars.get(key)
            if bar is None:
                bar = self.bars[key] = tqdm(total=st["total"], desc=desc, position=len(self.bars), leave=True,
                                            bar_format=BAR_FORMAT, dynamic_ncols=True, unit="step")
            bar.total = st["total"]
            bar.set_postfix(post, refresh=False)
            bar.update(step - bar.n)
            return
        total = st["total"] or 0
        if st["done"] or (step > st["printed"] and step - max(st["printed"], 0) >= max(1, total // 10)):
            st["printed"] = step
            post_s = "".join(f", {k} {v}" for k, v in post.items())
            print(tqdm.format_meter(step, st["total"], time.time() - st["t0"], prefix=desc, bar_format=LINE_FORMAT,
                                    postfix=post_s.lstrip(", ") or None, unit="step")
                  + (" (done)" if st["done"] else ""), flush=True)


class LiveProgress:
    """Live progress of a loop: a tqdm bar on a terminal, else one line every ``interval`` seconds."""

    def __init__(self, total: int, desc: str, interval: float = 30.0, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total, self.desc, self.interval, self.enabled = total, desc, interval, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True) if self.tty else None
        self.t0 = self.last = time.time()
        self.n = 0
        self.stats: dict[str, float] = {}

    def update(self, n: int, **stats: float) -> None:
        """Advance to position ``n`` (cheap: call it every step); ``stats`` (e.g. loss) are shown until replaced."""
        if not self.enabled:
            return
        self.stats.update(stats)
        text = " ".join(f"{k} {v:.4g}" for k, v in self.stats.items())
        if self.bar is not None:
            if stats:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n - self.n)
        elif time.time() - self.last >= self.interval or n >= self.total:
            el = time.time() - self.t0
            eta = el / max(n, 1) * (self.total - n)
            print(f"[{self.desc}] {n}/{self.total} {text} elapsed {el:.0f}s eta {eta:.0f}s", flush=True)
            self.last = time.time()
        self.n = n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
