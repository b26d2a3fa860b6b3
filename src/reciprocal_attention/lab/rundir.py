"""A run directory: where a run is, what it resumes from, and its repair before writing.

    RUN/config.toml        the resolved config (written before any step)
    RUN/.lock              pid and host of the process writing the run (see :mod:`.runlock`)
    RUN/checkpoints/       step_N/ directories and ``latest``, the commit point (see :mod:`.checkpoint`)
    RUN/metrics.jsonl      one strict-JSON record per log step / evaluation / non-finite event
    RUN/loss_curve.png, RUN/summary.json   written at the end
    RUN/data/              the fixture corpus, when ``data.fixture`` is set

``--resume DIR`` accepts the run directory, its ``checkpoints/`` or one ``step_N/`` in it, and writes into that
run directory, whatever the saved config's ``system.out_dir`` says, so a moved or copied run continues where it is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import TrainConfig, merge, read_toml, validate
from .errors import CheckpointError

log = logging.getLogger(__name__)
CONFIG_FILE = "config.toml"
# Keys a resumed run needs in state.json besides the checkpoint's own (see checkpoint.STATE_SCHEMA).
RESUME_SCHEMA: dict[str, tuple] = {
    "tokens": (int,), "data_position": (int,), "train_seconds": (int, float), "best_val_loss": (int, float, type(None)),
    "world_size": (int,), "rank_rng": (list, type(None)), "config": (dict,), "skipped_steps": (int,)}


def run_dir_of(path: str | Path) -> Path:
    """The run directory that ``--resume path`` continues: ``path`` itself, or the run holding a
    ``checkpoints/`` root or a ``step_N`` directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--resume {p}: does not exist")
    if (p / "checkpoints").is_dir() or (p / CONFIG_FILE).is_file():
        return p
    if (p / ckpt.LATEST).is_file() or p.name == "checkpoints":
        return p.parent
    if (p / ckpt.STATE_FILE).is_file() and p.parent.name == "checkpoints":
        return p.parent.parent
    raise CheckpointError(f"--resume {p}: not a run directory (no checkpoints/ and no {CONFIG_FILE}); "
                          f"pass --out DIR to say where the resumed run writes")


def committed_state(path: str | Path) -> dict[str, Any] | None:
    """The validated state of the checkpoint ``--resume path`` continues from, or None when ``path`` is a run
    directory with no committed checkpoint yet (the run then starts again from step 0 with its config.toml)."""
    p = Path(path)
    is_step = (p / ckpt.STATE_FILE).is_file() or ckpt.is_step_dir(p)
    if not is_step and not (p / ckpt.LATEST).is_file() and not (p / "checkpoints" / ckpt.LATEST).is_file():
        run_dir_of(p)  # a run directory (else a clear error), killed before its first commit
        return None
    state = ckpt.read_state(p)
    ckpt.check_schema(state, RESUME_SCHEMA, Path(state["dir"]) / ckpt.STATE_FILE)
    return state


def resume_config(path: str | Path) -> TrainConfig:
    """The config a ``--resume path`` run continues with: its checkpoint's, or the run's config.toml when no
    checkpoint was committed before it stopped."""
    state = committed_state(path)
    if state is not None:
        return TrainConfig.from_dict(state["config"])
    f = run_dir_of(path) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"--resume {path}: no committed checkpoint and no {CONFIG_FILE}: nothing to resume; "
                              f"start the run again with --preset/--config")
    cfg = TrainConfig()
    merge(cfg, read_toml(f), origin=str(f))
    validate(cfg)
    return cfg


def prepare(out: Path, resume: str | Path | None) -> dict[str, Any] | None:
    """Make ``out`` ready for this process to write (call it holding the run's lock): remove what an interrupted
    writer left, and return the state to resume from (None: start at step 0).

    Refuses to start a fresh run over committed checkpoints, and to resume an older checkpoint of this same run
    than its latest (that would discard later ones: resume into another directory with --out)."""
    out.mkdir(parents=True, exist_ok=True)
    root = out / "checkpoints"
    removed = ckpt.repair(root)
    if removed:
        log.info("removed what an interrupted run left in %s: %s", root, ", ".join(removed))
    state = committed_state(resume) if resume is not None else None
    latest = ckpt.read_latest(root)
    if resume is not None and state is None:
        log.info("%s has no committed checkpoint: starting the run again from step 0", out)
    if latest is None:
        return state
    if state is None:
        raise CheckpointError(f"{out} already holds a run (checkpoints up to {latest}); resume it with --resume "
                              f"{out}, or start a new run with another --out")
    if state["step"] < ckpt.step_of(latest):
        raise CheckpointError(f"{root} already has checkpoints after step {state['step']} (up to {latest}); "
                              f"resume into another directory with --out DIR")
    return state
