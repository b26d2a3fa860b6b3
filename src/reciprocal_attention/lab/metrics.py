"""``RUN/metrics.jsonl``: one strict-JSON record per log step, evaluation and non-finite event (rank 0), optionally
mirrored to TensorBoard; and the loss-curve plot.

A resumed run repairs the file first: a torn last line (a kill mid-append) is dropped, and every record the
interrupted run wrote after its last committed checkpoint is removed, because the resumed run redoes those steps.
So the file of a resumed run holds each step once, as an uninterrupted run's does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import atomic
from .errors import CheckpointError

log = logging.getLogger(__name__)


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """All records of a metrics file. A last line that is not valid JSON (torn by a kill) is dropped when
    ``repair`` (with a log message), else an error; a bad line elsewhere is always a :class:`CheckpointError`."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record with an int 'step'")
        except ValueError as e:
            if repair and i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(line))
                break
            raise CheckpointError(f"{path}, line {i + 1}: not a metrics record ({e})") from None
        out.append(rec)
    return out


class Metrics:
    """``metrics.jsonl`` (written by rank 0 only), optionally mirrored to TensorBoard."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled, self.tb = out_dir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if resume_step is None:
            atomic.write_text(self.path, "")
        else:  # drop what the interrupted run logged after its checkpoint: it is about to be redone
            kept = [r for r in read_records(self.path, repair=True) if self._before(r, resume_step)]
            atomic.write_text(self.path, "".join(atomic.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed; skipping TensorBoard logging (metrics.jsonl has everything)")
        else:
            self.tb = SummaryWriter(str(out_dir / "tb"))

    @staticmethod
    def _before(rec: dict, step: int) -> bool:
        """Whether a record precedes the checkpoint of ``step``. The evaluation at a checkpoint's step is logged
        before it is saved, but a resumed run evaluates again there, so that record is redone too."""
        return rec["step"] < step or (rec["step"] == step and rec.get("kind") == "train")

    @staticmethod
    def read(path: Path) -> list[dict]:
        """All records of a metrics file (a torn last line is skipped)."""
        return read_records(path, repair=True)

    def write(self, record: dict) -> None:
        """Append one record (non-finite numbers become null)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(atomic.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(metrics_path: Path, out_png: Path, title: str) -> None:
    """Train and eval loss against tokens, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = Metrics.read(metrics_path)
    tr = [r for r in recs if r["kind"] == "train" and r.get("loss") is not None]
    ev = [r for r in recs if r["kind"] == "eval" and r.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if tr:
        ax.plot([r["tokens"] for r in tr], [r["loss"] for r in tr], lw=0.8, alpha=0.8, label="train (batch)")
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["loss"] for r in ev], "o-", ms=3, label=f"{ev[0]['split']} (fixed set)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if tr or ev:
        ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
