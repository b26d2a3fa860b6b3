"""The MQAR grid: recall accuracy against model width and number of key-value pairs, per arm, over seeds.

Zoology-style protocol (:mod:`reciprocal_attention.lab.mqar`): 2-layer probe models, a 256-token vocabulary
(Zoology's small setting; its large one, 8k, is ``--vocab 8192``), a small learning-rate sweep per arm and several
seeds per cell. One command runs a grid (or what of it fits a deadline) on
one device with several worker processes that claim runs from a shared list in priority order; finished runs are
kept as one JSON file each, so a second invocation resumes where the first stopped. The report (``mqar.json``,
``mqar.md``, ``mqar.png``; :mod:`.mqar_report`) merges every finished run under the output directory and lists what
remains; ``--restore mqar.json`` puts a report's runs back into a folder, so a grid resumes from its committed report.

    python -m reciprocal_attention.lab.mqar_study --out runs/mqar --parallel 12 --deadline 480
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model import build_attention
from .atomic import write_json
from .errors import UserError, read_user_json
from .mqar import MQARRun, MQARSpec, probe_config, train_group
from .mqar_report import ARMS, BASELINE, VALID_ARMS, load_records, markdown, plot
from .progress import LiveProgress
from .runlock import RunLock
from .runtime import pinned_env, visible_gpus

log = logging.getLogger(__name__)



@dataclass
class GridConfig:
    """The grid, in priority order: the width sweep at ``width_task``, then the n_kv sweep at ``kv_width``;
    within each, learning rates in the order given (the first is the main one), then seeds, then arms."""

    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    widths: list[int] = field(default_factory=lambda: [64, 128, 256])
    # On an H100 with 2000 steps at lr 3e-3 every arm learned 4 pairs at seq 64 in most seeds and none left chance
    # (~0.09) at 16 pairs, seq 128, for widths 64-256; the baseline at 8 pairs, seq 64 (width 128) was at 0.145
    # after 1500 steps (CPU, one seed). So the width sweep is at 4 pairs, where learning to recall happens within
    # the budget, and the pairs sweep spans 4-32; 64 pairs at seq 512 waits for a longer step budget.
    width_task: tuple[int, int] = (64, 4)  # (seq_len, n_kv) of the width sweep
    kv_width: int = 128
    kv_sweep: list[tuple[int, int]] = field(default_factory=lambda: [(64, 4), (64, 8), (128, 16), (256, 32)])
    # 1e-3 first: at 8 pairs, seq 64, width 128 (vocabulary 256, batch 256) the baseline learned recall in none of 6
    # seeds at 3e-3 in 2000 steps on an H100, and in 4 of the 6 by steps 750-1250 at 1e-3 on a CPU (reports/quality/
    # mqar-cpu-8pairs-v256-b256/); on the CPU's vocabulary-65 setting 3e-3 left every arm at chance
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    steps: int = 2000
    # 256 (Zoology's small-vocabulary setting) rather than its 8192: with 8192 the baseline's accuracy was still 0
    # after 800 steps of batch 256 at lr 3e-3 (CPU, 4 pairs, seq 32, width 128); with 256 and the same settings it
    # solves that task by step 500.
    vocab_size: int = 256
    batch_size: int = 256
    eval_every: int = 250
    tie_embeddings: bool = False
    out_dir: str = "runs/mqar"
    parallel: int = 1
    # runs of one task shape and learning rate that a worker trains together, each on its own CUDA stream
    # (lab/mqar.py, train_group); 1 = one run at a time
    group: int = 1
    deadline_s: float = 0.0  # stop starting runs and end the workers after this many seconds; 0 = none

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        bad = [a for a in self.arms if a.partition(":")[0] not in VALID_ARMS]
        if bad:
            raise ValueError(f"arms: unknown {bad}; valid arms: {', '.join(VALID_ARMS)}, each optionally with one "
                             f"argument changed (PRESET:key=value, e.g. ra_disc:rank=7)")
        for arm in self.arms:  # an override must build: a bad key or value fails here, not in a worker
            try:
                build_attention(probe_config(arm, 64, MQARSpec(seq_len=16, n_kv=2, n_queries=2, n_keys=4,
                                                               n_values=4)), use_ra=True)
            except (TypeError, ValueError) as e:
                raise ValueError(f"arms: {arm!r} does not build: {e}") from None
        if BASELINE not in self.arms:
            raise ValueError(f"arms must include the baseline {BASELINE!r}")
        for name in ("seeds", "widths", "lrs"):
            v = getattr(self, name)
            if not v or len(set(v)) != len(v):
                raise ValueError(f"{name} must be a non-empty list of distinct values; got {v}")
        if any(w < 32 or w % 32 for w in [*self.widths, self.kv_width]):
            raise ValueError(f"widths and kv_width must be multiples of 32; got {self.widths}, {self.kv_width}")
        if any(lr <= 0 for lr in self.lrs) or self.steps < 1 or self.parallel < 1 or self.deadline_s < 0:
            raise ValueError("lrs must be > 0, steps >= 1, parallel >= 1 and deadline_s >= 0")
        if self.group < 1:
            raise ValueError(f"group must be >= 1 (runs trained together by one worker); got {self.group}")

    def runs(self) -> list[MQARRun]:
        """Every run of the grid, in priority order, without duplicates."""
        cells = [(w, *self.width_task) for w in self.widths] + [(self.kv_width, t, kv) for t, kv in self.kv_sweep]
        out: dict[str, MQARRun] = {}
        for lr in self.lrs:
            for d, seq_len, n_kv in cells:
                for seed in self.seeds:
                    for arm in self.arms:
                        r = MQARRun(arm=arm, seed=seed, d_model=d, seq_len=seq_len, n_kv=n_kv, lr=lr,
                                    steps=self.steps, vocab_size=self.vocab_size, batch_size=self.batch_size,
                                    eval_every=self.eval_every, tie_embeddings=self.tie_embeddings)
                        out.setdefault(r.key, r)
        return list(out.values())


# --------------------------------------------------------------------------------------------------------------
# Running: a parent hands a job list to worker processes that claim runs, a group of one task shape at a time
# --------------------------------------------------------------------------------------------------------------

def _result_path(out: Path, run: MQARRun) -> Path:
    return out / "runs" / f"{run.key}.json"


# MQARRun fields that the run's key (its file name) leaves out: one value of each per folder, or a result of one
# setting would count as a finished run of another
SETTINGS_OUTSIDE_KEY = ("batch_size", "n_layer", "eval_every", "eval_sequences", "stop_at", "weight_decay")


def check_folder_settings(out: Path, runs: list[MQARRun]) -> None:
    """Raise :class:`UserError` when ``out/runs`` holds results trained with other settings than ``runs`` (or than
    each other) in a field the run key leaves out (:data:`SETTINGS_OUTSIDE_KEY`): such a folder would resume and
    report one setting's runs as another's."""
    want = {k: {getattr(r, k) for r in runs} for k in SETTINGS_OUTSIDE_KEY}
    seen: dict[str, set] = {k: set() for k in SETTINGS_OUTSIDE_KEY}
    for f in sorted((out / "runs").glob("*.json")) if (out / "runs").is_dir() else []:
        rec = json.loads(f.read_text())
        for k in SETTINGS_OUTSIDE_KEY:
            if k in rec:
                seen[k].add(rec[k])
    for k in SETTINGS_OUTSIDE_KEY:
        values = seen[k] | want[k]
        if len(values) > 1:
            raise UserError(f"{out / 'runs'} holds runs with {k} {sorted(seen[k])} and this grid asks for "
                            f"{sorted(want[k]) or '-'}: one {k} per folder; use another --out for this setting")


def restore_runs(out: Path, report: str | Path) -> list[str]:
    """Write the finished runs recorded in ``report`` (an ``mqar.json`` of :func:`write_report`) into ``out/runs``
    where their result files are missing, so the grid resumes and reports them on a machine that never held that
    folder. A run already in the folder is kept; a folder whose study is running is refused
    (:class:`RunLockedError`). Returns the keys of the runs restored."""
    path = Path(report)
    recs = read_user_json(path, "--restore: an mqar.json written by this study")
    fields = set(MQARRun.__dataclass_fields__)
    if not isinstance(recs, list) or not all(isinstance(r, dict) and {"arm", "seed", "accuracy"} <= set(r)
                                             for r in recs):
        raise UserError(f"--restore {path}: not an mqar.json (a list of run records with arm, seed and accuracy)")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    restored, derived = [], ("best_lr", "steps_to_solve")  # derived: recomputed by load_records from the folder
    with RunLock(out):  # not into a folder whose study is running (its workers may be training these runs)
        for rec in recs:
            run = MQARRun(**{k: v for k, v in rec.items() if k in fields and v is not None})
            dest = _result_path(out, run)
            if dest.exists():
                continue
            write_json(dest, {**{k: v for k, v in rec.items() if k not in derived}, "restored_from": str(path)})
            restored.append(run.key)
    log.info("restored %d finished run(s) from %s", len(restored), path)
    return restored


def _shape_key(run: MQARRun) -> tuple:
    """What runs trained together share: everything but the arm and the seed."""
    d = asdict(run)
    return tuple(v for k, v in d.items() if k not in ("arm", "seed"))


def _claim(out: Path, run: MQARRun) -> bool:
    """Claim ``run`` for this worker: a file created exclusively (one worker per run); False if taken or done."""
    if _result_path(out, run).exists():
        return False
    try:
        os.close(os.open(out / "claims" / run.key, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _next_group(out: Path, jobs: list[MQARRun], size: int) -> list[MQARRun]:
    """The first unclaimed run in priority order and up to ``size - 1`` more of its task shape, claimed."""
    group: list[MQARRun] = []
    for run in jobs:
        if group and (len(group) == size or _shape_key(run) != _shape_key(group[0])):
            continue
        if _claim(out, run):
            group.append(run)
    return group


def worker(out: Path, deadline: float, group: int = 1) -> int:
    """Run unclaimed, unfinished jobs of ``out/jobs.json`` in order, ``group`` of one task shape at a time, until
    none is left or ``deadline`` (epoch s)."""
    jobs = [MQARRun(**j) for j in json.loads((out / "jobs.json").read_text())]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        from ..ops import settings

        settings.flash_autotune = False  # workers share the card: one fixed config per Triton attention kernel
    torch.set_num_threads(1)  # several workers share the cores
    failures = 0
    while not (deadline and time.time() >= deadline) and (runs := _next_group(out, jobs, group)):
        try:
            recs = train_group(runs, device, progress=False)
        except Exception as e:  # one bad group must not stop the grid: recorded, reported, retried next invocation
            log.exception("mqar runs %s failed", [r.key for r in runs])
            (out / "failed").mkdir(exist_ok=True)
            for run in runs:
                (out / "failed" / f"{run.key}.txt").write_text(f"{type(e).__name__}: {e}\n")
            failures += 1
            continue
        for run, rec in zip(runs, recs):
            res = _result_path(out, run)
            tmp = res.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, indent=1))
            tmp.replace(res)
            print(f"[mqar] {run.key}: accuracy {rec['accuracy']:.3f} after {rec['steps_run']} steps "
                  f"({rec['steps_per_s']:.0f} steps/s in a group of {len(runs)})", flush=True)
    return 1 if failures else 0


def run_grid(gc: GridConfig, progress: bool = True) -> list[MQARRun]:
    """Run the grid's unfinished runs with ``parallel`` workers until done or the deadline; returns what remains.

    One study per folder at a time (:class:`~reciprocal_attention.lab.runlock.RunLock` on ``out_dir``): a second
    one would clear the live workers' claims and train their runs again; it gets a :class:`RunLockedError`
    naming the holder instead."""
    gc.validate()
    out = Path(gc.out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        return _run_grid(gc, out, progress)


def _run_grid(gc: GridConfig, out: Path, progress: bool) -> list[MQARRun]:
    (out / "claims").mkdir(exist_ok=True)
    for c in (out / "claims").iterdir():  # this study holds the folder: claims left by a stopped one are stale
        c.unlink()
    for f in (out / "failed").glob("*.txt") if (out / "failed").exists() else []:
        f.unlink()  # failed runs are retried
    jobs = gc.runs()
    check_folder_settings(out, jobs)
    todo = [r for r in jobs if not _result_path(out, r).exists()]
    (out / "jobs.json").write_text(json.dumps([asdict(r) for r in todo], indent=1))
    (out / "grid.json").write_text(json.dumps(asdict(gc), indent=1))
    if not todo:
        return []
    t0 = time.time()
    deadline = t0 + gc.deadline_s if gc.deadline_s else 0.0
    n = min(gc.parallel, len(todo))
    print(f"[mqar] {len(jobs) - len(todo)} of {len(jobs)} runs already finished; {len(todo)} to run with {n} "
          f"worker processes" + (f", deadline {gc.deadline_s:.0f}s" if deadline else ""), flush=True)
    gpus = visible_gpus()  # several GPUs: the workers spread over them, round robin
    procs = [subprocess.Popen([sys.executable, "-m", "reciprocal_attention.lab.mqar_study", "--worker",
                               "--out", str(out), "--deadline-at", str(deadline), "--group", str(gc.group)],
                              stdout=open(out / f"worker-{i}.log", "a"), stderr=subprocess.STDOUT,
                              env=pinned_env(gpus[i % len(gpus)] if len(gpus) > 1 else None))
             for i in range(n)]
    bar = LiveProgress(len(todo), "mqar grid", enabled=progress)
    while any(p.poll() is None for p in procs):
        time.sleep(1.0)
        bar.update(sum(_result_path(out, r).exists() for r in todo))
        if deadline and time.time() > deadline + 5:
            log.warning("mqar grid: deadline reached; stopping the workers (unfinished runs resume on the next "
                        "invocation)")
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()
    bar.close()
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, -15)]
    if bad:
        log.warning("mqar workers %s ended with an error; see %s", bad, [str(out / f"worker-{i}.log") for i in bad])
    return [r for r in jobs if not _result_path(out, r).exists()]


def write_report(gc: GridConfig, report_dir: Path, remaining: list[MQARRun] | None = None) -> list[dict[str, Any]]:
    """Write ``mqar.json`` (the records), ``mqar.md`` and ``mqar.png`` into ``report_dir``; returns the records."""
    check_folder_settings(Path(gc.out_dir), gc.runs())
    recs = load_records(Path(gc.out_dir))
    if remaining is None:
        remaining = [r for r in gc.runs() if not _result_path(Path(gc.out_dir), r).exists()]
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "mqar.json").write_text(json.dumps(recs, indent=1))
    (report_dir / "mqar.md").write_text(markdown(recs, remaining))
    plot(recs, gc.width_task, gc.kv_width, report_dir / "mqar.png")
    return recs


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

def _list(kind: type, text: str) -> list:
    return [kind(v) for v in text.split(",") if v]


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in (p.split(":") for p in text.split(",") if p)]
    except ValueError:
        raise ValueError(f"expected SEQ:KV pairs separated by commas (e.g. 128:16,256:32); got {text!r}") from None


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, GridConfig]:
    d = GridConfig()
    ap = argparse.ArgumentParser(prog="python -m reciprocal_attention.lab.mqar_study",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=d.out_dir, help="run directory (resumable)")
    ap.add_argument("--report", default=None, help="where mqar.json/md/png go (default: --out)")
    ap.add_argument("--arms", default=",".join(d.arms),
                    help="comma-separated presets, each optionally with one argument changed "
                         "(PRESET:key=value, e.g. ra_disc:rank=7)")
    ap.add_argument("--seeds", default=",".join(map(str, d.seeds)))
    ap.add_argument("--widths", default=",".join(map(str, d.widths)))
    ap.add_argument("--width-task", default="%d:%d" % d.width_task, help="SEQ:KV of the width sweep")
    ap.add_argument("--kv-width", type=int, default=d.kv_width)
    ap.add_argument("--kv-sweep", default=",".join(f"{t}:{k}" for t, k in d.kv_sweep), help="SEQ:KV,...")
    ap.add_argument("--lrs", default=",".join(f"{x:g}" for x in d.lrs), help="the first is the main one")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--vocab", type=int, default=d.vocab_size)
    ap.add_argument("--batch", type=int, default=d.batch_size)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--tie", action="store_true", help="tie the output layer to the embedding (no output bias)")
    ap.add_argument("--parallel", type=int, default=None, help="worker processes (default: 12 on CUDA, 1 on CPU)")
    ap.add_argument("--group", type=int, default=d.group,
                    help="runs of one task shape a worker trains together, each on its own CUDA stream (default 1)")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds for the whole grid in this invocation (0 = none)")
    ap.add_argument("--plan", action="store_true", help="print the runs in priority order and exit")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--restore", default=None, metavar="MQAR_JSON",
                    help="first write the finished runs recorded in an earlier report (its mqar.json) into --out "
                    "where they are missing: the grid resumes from a committed report")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        gc = GridConfig(arms=_list(str, args.arms), seeds=_list(int, args.seeds), widths=_list(int, args.widths),
                        width_task=_pairs(args.width_task)[0], kv_width=args.kv_width,
                        kv_sweep=_pairs(args.kv_sweep), lrs=_list(float, args.lrs), steps=args.steps,
                        vocab_size=args.vocab, batch_size=args.batch, eval_every=args.eval_every,
                        tie_embeddings=args.tie, out_dir=args.out,
                        parallel=args.parallel or (12 if torch.cuda.is_available() else 1),
                        deadline_s=args.deadline, group=args.group)
        gc.validate()
        gc.runs()  # validates every task shape (MQARSpec)
    except (ValueError, IndexError) as e:
        raise UserError(str(e) or "bad grid arguments") from None
    return args, gc


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the grid and write the report; ``--worker`` is the per-process entry of :func:`run_grid`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args, gc = parse_args(argv)
    except UserError as e:  # one line, exit 2, as the `ra` CLI does
        print(f"mqar_study: error: {e}", file=sys.stderr)
        return 2
    if args.worker:
        return worker(Path(args.out), args.deadline_at, gc.group)
    if args.plan:
        try:
            for i, r in enumerate(gc.runs()):
                done = "done" if _result_path(Path(gc.out_dir), r).exists() else "todo"
                print(f"{i:4d} {done} {r.key}", flush=True)
        except BrokenPipeError:  # the reader stopped early (e.g. `| head`): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        if args.restore:
            restore_runs(Path(gc.out_dir), args.restore)
        remaining = None if args.report_only else run_grid(gc)
        write_report(gc, Path(args.report or args.out), remaining)
    except UserError as e:
        print(f"mqar_study: error: {e}", file=sys.stderr)
        return 2
    print(markdown(load_records(Path(gc.out_dir)), remaining), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
