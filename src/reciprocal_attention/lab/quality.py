"""``ra quality``: does RA help? A paired, multi-seed study with controls (RA-SPEC section 5).

Arms differ only in the attention (``model.attn``), in order of interest: ``standard`` (baseline), ``ra``,
``full``, ``output_gate`` (a control that adds learned per-head gating without any reciprocal term), then ``seed``
and ``ra_disc``; the first four run first for every seed, so a study cut short has whole pairs of those. Seed ``s``
gives every arm the same shared-parameter init and the same data order, so differences are paired by seed.

Two lenses:
* language modelling on the offline corpus: final validation loss / perplexity at equal tokens (or equal
  wall-clock with ``--equal wallclock``), per-arm mean and std, paired differences against the baseline, and the
  noise floor: the baseline against itself with another seed. A claim of "better" needs a paired difference
  larger than the noise floor in every seed;
* multi-query associative recall (MQAR, :mod:`reciprocal_attention.lab.mqar`): the probe grid's main cell
  (``--mqar``; the full grid is :mod:`reciprocal_attention.lab.mqar_study`).

Runs are separate processes (several share one device: ``--parallel``), each in its own run directory; the study
is resumable: finished runs are kept, interrupted ones (``--deadline``, ``--run-timeout``, a lost machine) resume
from their last checkpoint, and the report merges all, says which runs remain, and keeps earlier studies
(``--prior``) as one row each. The report records every finished run (``runs`` in ``quality.json``), so
``--restore`` resumes the study from its committed report on a machine that never held its run directories.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import write_json, write_text
from .config import load_config, to_toml
from .data import load_manifest
from .errors import UserError, read_user_json
from .progress import RunProgress
from .quality_report import load_prior, markdown, paired_verdict, write_report
from .quality_wallclock import equal_wallclock
from .runtime import pinned_env, visible_gpus

log = logging.getLogger(__name__)

ARMS = ("standard", "ra", "full", "output_gate", "seed", "ra_disc")  # in order of interest
FIRST_ARMS = 4  # the arms of first interest: run for every seed before the rest
BASELINE = "standard"
# what the analysis reads of a finished run's summary.json; the report keeps them per run (``runs``), so a study
# resumes from its committed report on a machine that never held its run directories (``--restore``)
RUN_FIELDS = ("final_val_loss", "tokens", "tokens_per_s", "device_name", "device", "dtype", "params")


@dataclass
class QualityConfig:
    """The study. ``preset`` is a training preset (``quality-cpu``, ``quality-gpu``); ``overrides`` apply to all."""

    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    preset: str = "quality-cpu"
    overrides: list[str] = field(default_factory=list)
    out_dir: str = "runs/quality"
    parallel: int = 1
    equal: str = "tokens"  # tokens | wallclock
    wall_seconds: float = 0.0  # per run, with equal="wallclock"
    mqar: bool = False
    mqar_steps: int = 1000
    mqar_seq_len: int = 64
    mqar_kv: int = 8
    mqar_width: int = 128
    mqar_vocab: int = 8192
    run_timeout: float = 0.0  # seconds per training process; 0 = none
    deadline_s: float = 0.0  # seconds for the whole study in this invocation: then running jobs stop (resumable); 0 = none
    device_label: str = ""  # where the training runs ran, when the report is assembled elsewhere
    prior: list[str] = field(default_factory=list)  # quality.json of earlier studies, kept as one row each

    def validate(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ValueError(f"unknown arm(s) {bad}; valid arms: {', '.join(ARMS)}")
        if BASELINE not in self.arms:
            raise ValueError(f"arms must include the baseline {BASELINE!r} (paired differences are against it)")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct ints; got {self.seeds}")
        if self.equal not in ("tokens", "wallclock"):
            raise ValueError(f"equal must be 'tokens' or 'wallclock'; got {self.equal!r}")
        if self.equal == "wallclock" and self.wall_seconds <= 0:
            raise ValueError("equal='wallclock' needs wall_seconds > 0")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1; got {self.parallel}")
        if self.deadline_s < 0 or self.run_timeout < 0:
            raise ValueError(f"deadline_s and run_timeout must be >= 0; got {self.deadline_s}, {self.run_timeout}")


def run_dir(qc: QualityConfig, arm: str, seed: int) -> Path:
    return Path(qc.out_dir) / "runs" / f"{arm}-s{seed}"


def run_progress(qc: QualityConfig) -> RunProgress:
    """Live progress of every run of the study (step, loss, ETA), read from their metrics as they train."""
    return RunProgress({(arm, seed): run_dir(qc, arm, seed) for seed in qc.seeds for arm in qc.arms})


def run_overrides(qc: QualityConfig, arm: str, seed: int) -> list[str]:
    """The overrides that make one run of the study: attention arm, paired seeds, budget mode."""
    ov = list(qc.overrides) + [f"model.attn={arm}", f"system.seed={seed}", f"data.seed={seed}",
                               f"system.out_dir={run_dir(qc, arm, seed)}", "system.progress=false"]
    if qc.equal == "wallclock":
        ov += [f"budget.max_seconds={qc.wall_seconds}"]
    return ov


def _launch(qc: QualityConfig, arm: str, seed: int, gpu: str | None = None) -> subprocess.Popen | None:
    """Start (or resume) one training run as a subprocess (pinned to ``gpu`` when given); None if it already
    finished."""
    d = run_dir(qc, arm, seed)
    if (d / "summary.json").exists():
        return None
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "reciprocal_attention.lab.train"]
    if (d / "checkpoints").exists() and any((d / "checkpoints").iterdir()):
        cmd += ["--resume", str(d), "--set", "system.progress=false"]
        log.info("resuming %s-s%d from its last checkpoint", arm, seed)
    else:
        cfg = load_config(qc.preset, None, run_overrides(qc, arm, seed))
        (d / "requested.toml").write_text(to_toml(cfg))
        cmd += ["--config", str(d / "requested.toml")]
    return subprocess.Popen(cmd, stdout=open(d / "train.log", "a"), stderr=subprocess.STDOUT, env=pinned_env(gpu))


def job_order(qc: QualityConfig) -> list[tuple[str, int]]:
    """``(arm, seed)`` in launch order: the arms of first interest for every seed, then the others; seed-major
    within each group, so a study cut short still has whole pairs."""
    tier = {a: int(ARMS.index(a) >= FIRST_ARMS) for a in qc.arms}
    return sorted(((a, s) for s in qc.seeds for a in qc.arms),
                  key=lambda j: (tier[j[0]], qc.seeds.index(j[1]), ARMS.index(j[0])))


def remaining(qc: QualityConfig) -> list[str]:
    """The ``arm-sSEED`` runs of the study without a finished result, in launch order."""
    return [f"{a}-s{s}" for a, s in job_order(qc) if not (run_dir(qc, a, s) / "summary.json").exists()]


STOP_GRACE_S = 60.0  # time a stopped run gets to write its checkpoint before it is killed


def _study_key(preset: str | None, overrides: list[str], equal: str | None) -> tuple:
    """What makes two studies' runs comparable: the preset, the overrides of what is trained (``system.*`` settings,
    such as threads or autotuning, may differ) and what is held equal."""
    return preset, equal, sorted(o for o in overrides if not o.startswith("system."))


def restore_runs(qc: QualityConfig, report: str | Path) -> list[str]:
    """Write the finished runs recorded in ``report`` (a ``quality.json`` of this study) into ``qc.out_dir`` as run
    directories the study counts as finished (``summary.json`` and the evaluation curve in ``metrics.jsonl``), so
    the study resumes where its run directories were lost. A run with a directory here is kept as it is. Returns
    the names of the runs restored."""
    path = Path(report)
    res = read_user_json(path, "--restore: a quality.json written by `ra quality`")
    if not isinstance(res, dict) or not isinstance(res.get("runs"), dict):
        raise UserError(f"--restore {path}: the report has no per-run records (`runs`); only a quality.json written "
                        "by this version of `ra quality` can be restored from")
    theirs = res.get("config", {})
    if _study_key(theirs.get("preset"), theirs.get("overrides", []), theirs.get("equal")) != _study_key(
            qc.preset, qc.overrides, qc.equal):
        raise UserError(f"--restore {path}: that report's study (preset {theirs.get('preset')!r}, overrides "
                        f"{theirs.get('overrides')}, equal {theirs.get('equal')!r}) is not this one (preset "
                        f"{qc.preset!r}, overrides {qc.overrides}, equal {qc.equal!r}); `system.*` overrides may differ")
    restored, kept = [], []
    for name, rec in res["runs"].items():
        arm, _, seed = name.rpartition("-s")
        if arm not in qc.arms or not seed.isdigit() or int(seed) not in qc.seeds:
            continue
        d = run_dir(qc, arm, int(seed))
        if d.exists() and any(d.iterdir()):
            kept.append(name)
            continue
        d.mkdir(parents=True, exist_ok=True)
        curve = res.get("curves", {}).get(name, [])
        write_text(d / "metrics.jsonl", "".join(json.dumps({"kind": "eval", "tokens": t, "loss": loss}) + "\n"
                                                for t, loss in curve))
        write_json(d / "summary.json", {**rec, "restored_from": str(path)})
        restored.append(name)
    log.info("restored %d finished run(s) from %s: %s", len(restored), path, ", ".join(restored) or "none")
    if kept:
        log.info("kept the run directories already in %s for: %s", qc.out_dir, ", ".join(kept))
    return restored


def _wait_stopped(p: subprocess.Popen) -> int:
    """Wait for a run sent SIGTERM to checkpoint and exit; kill it (losing only its last steps) after
    :data:`STOP_GRACE_S`."""
    try:
        return p.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("a stopped run did not exit within %.0fs; killing it (it resumes from its last checkpoint)",
                    STOP_GRACE_S)
        p.kill()
        return p.wait()


def run_study(qc: QualityConfig) -> None:
    """Run every (arm, seed) training job, ``parallel`` at a time, until done or ``deadline_s``; finished ones are
    skipped; at the deadline each running one is sent SIGTERM, checkpoints the step it is on, and resumes there on
    the next invocation."""
    qc.validate()
    jobs = job_order(qc)
    # (arm, seed, process, start time, the GPU it is pinned to: with several GPUs, the least busy one)
    running: list[tuple[str, int, subprocess.Popen, float, str | None]] = []
    gpus = visible_gpus()
    failed = []
    deadline = time.time() + qc.deadline_s if qc.deadline_s else 0.0
    while jobs or running:
        if deadline and time.time() > deadline:
            for _, _, p, _, _ in running:  # SIGTERM: each run checkpoints the step it is on, then exits
                p.terminate()
            for arm, seed, p, _, _ in running:
                _wait_stopped(p)
                log.warning("%s seed %d stopped at the study's deadline (%ss); it resumes on the next invocation",
                            arm, seed, qc.deadline_s)
            break
        while jobs and len(running) < qc.parallel:
            arm, seed = jobs.pop(0)
            busy = [g for *_, g in running]
            gpu = min(gpus, key=busy.count) if len(gpus) > 1 else None
            p = _launch(qc, arm, seed, gpu)
            if p is not None:
                running.append((arm, seed, p, time.time(), gpu))
                print(f"[quality] started {arm} seed {seed}" + (f" on GPU {gpu}" if gpu else ""), flush=True)
        time.sleep(0.5)
        for item in list(running):
            arm, seed, p, t0, _ = item
            rc = p.poll()
            if rc is None and qc.run_timeout and time.time() - t0 > qc.run_timeout:
                p.terminate()
                rc = _wait_stopped(p)
                log.warning("%s seed %d hit run_timeout=%ss and was stopped (resumable)", arm, seed, qc.run_timeout)
            if rc is not None:
                running.remove(item)
                status = "done" if rc == 0 else f"FAILED rc={rc} (see {run_dir(qc, arm, seed) / 'train.log'})"
                print(f"[quality] {arm} seed {seed}: {status} in {time.time() - t0:.0f}s", flush=True)
                if rc != 0:
                    failed.append((arm, seed))
    if failed:
        log.warning("runs that failed (rerun `ra quality` with the same --out to retry): %s", failed)


# --------------------------------------------------------------------------------------------------------------
# MQAR lens: the probe grid's main cell at the study's arms and seeds
# --------------------------------------------------------------------------------------------------------------

def mqar_grid(qc: QualityConfig) -> Any:
    """The MQAR lens as a one-cell :class:`~reciprocal_attention.lab.mqar_study.GridConfig` under ``out/mqar``."""
    from .mqar_study import GridConfig

    return GridConfig(arms=list(qc.arms), seeds=list(qc.seeds), widths=[qc.mqar_width],
                      width_task=(qc.mqar_seq_len, qc.mqar_kv), kv_width=qc.mqar_width, kv_sweep=[], lrs=[1e-3],
                      steps=qc.mqar_steps, vocab_size=qc.mqar_vocab, out_dir=str(Path(qc.out_dir) / "mqar"),
                      parallel=qc.parallel)


def mqar_accuracy(qc: QualityConfig) -> dict[str, dict[int, float]]:
    """``{arm: {seed: accuracy}}`` of the finished MQAR-lens runs."""
    from .mqar_report import load_records

    out: dict[str, dict[int, float]] = {}
    if (Path(qc.out_dir) / "mqar" / "runs").exists():
        for r in load_records(Path(qc.out_dir) / "mqar"):
            out.setdefault(r["arm"], {})[r["seed"]] = r["accuracy"]
    return out


# --------------------------------------------------------------------------------------------------------------
# Analysis and report
# --------------------------------------------------------------------------------------------------------------

def _load_run(d: Path) -> dict[str, Any] | None:
    if not (d / "summary.json").exists():
        return None
    s = json.loads((d / "summary.json").read_text())
    curve = []
    if (d / "metrics.jsonl").exists():
        for line in (d / "metrics.jsonl").read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == "eval":
                curve.append((r["tokens"], r["loss"] if "loss" in r else r.get("val_loss")))
    s["curve"] = curve
    return s


def analyse(qc: QualityConfig) -> dict[str, Any]:
    """Per-arm statistics, paired differences against the baseline, the noise floor and a verdict."""
    runs = {(a, s): _load_run(run_dir(qc, a, s)) for a in qc.arms for s in qc.seeds}
    arms: dict[str, Any] = {}
    for a in qc.arms:
        losses = {s: runs[(a, s)]["final_val_loss"] for s in qc.seeds if runs[(a, s)]}
        tps = [runs[(a, s)]["tokens_per_s"] for s in qc.seeds if runs[(a, s)] and runs[(a, s)].get("tokens_per_s")]
        vals = list(losses.values())
        arms[a] = {"val_loss": losses, "mean": statistics.fmean(vals) if vals else None,
                   "std": statistics.stdev(vals) if len(vals) > 1 else None,
                   "ppl_mean": math.exp(statistics.fmean(vals)) if vals else None,
                   "tokens_per_s_mean": statistics.fmean(tps) if tps else None,
                   "tokens": {s: runs[(a, s)]["tokens"] for s in qc.seeds if runs[(a, s)]}}
    base = arms[BASELINE]["val_loss"]
    floor_pairs = [abs(base[s] - base[t]) for s, t in itertools.combinations(sorted(base), 2)]
    noise = {"pairs": floor_pairs, "mean": statistics.fmean(floor_pairs) if floor_pairs else None,
             "max": max(floor_pairs) if floor_pairs else None}
    verdicts = {}
    for a in qc.arms:
        if a == BASELINE:
            continue
        diffs = {s: arms[a]["val_loss"][s] - base[s] for s in qc.seeds if s in base and s in arms[a]["val_loss"]}
        arms[a]["paired_diff"] = diffs
        arms[a]["paired_diff_mean"] = statistics.fmean(diffs.values()) if diffs else None
        arms[a]["paired_diff_rel_mean"] = (statistics.fmean(diffs[s] / base[s] for s in diffs) if diffs else None)
        verdicts[a] = paired_verdict(list(diffs.values()), len(qc.seeds), noise["max"], BASELINE)
    wallclock = equal_wallclock(runs, qc.arms, qc.seeds, BASELINE, noise["max"]) if qc.equal == "tokens" else None
    curves = {f"{a}-s{s}": runs[(a, s)]["curve"] for a in qc.arms for s in qc.seeds if runs[(a, s)]}
    cards: dict[str, list[str]] = {}  # card name -> the runs trained on it
    for (a, s), r in runs.items():
        if r and r.get("device_name"):
            cards.setdefault(r["device_name"], []).append(f"{a}-s{s}")
    any_run = next((r for r in runs.values() if r), {})
    tokens = sorted({r["tokens"] for r in runs.values() if r})
    if len(tokens) > 1 and qc.equal == "tokens":
        log.warning("finished runs differ in tokens (%s): tokens_per_run reports the largest", tokens)
    return {"tokens_per_run": tokens[-1] if tokens else None, "train_tokens": train_split_tokens(qc),
            "config": asdict(qc), "arms": arms,
            "runs": {f"{a}-s{s}": {k: r.get(k) for k in RUN_FIELDS} for (a, s), r in runs.items() if r},
            "noise_floor": noise, "verdicts": verdicts, "wallclock": wallclock, "mqar": mqar_accuracy(qc),
            "remaining": remaining(qc), "cards": cards,
            "prior_studies": load_prior(qc.prior),
            "curves": curves, "device": any_run.get("device"), "dtype": any_run.get("dtype"),
            "params": any_run.get("params"), "torch": torch.__version__,
            "gpu": qc.device_label or (torch.cuda.get_device_name() if torch.cuda.is_available() else None),
            "complete": all(runs.values())}


def train_split_tokens(qc: QualityConfig) -> int | None:
    """Tokens in the training split the study's runs read (None for a fixture or an unreadable corpus): with the
    tokens per run, how many passes over the data a run makes."""
    try:
        cfg = load_config(qc.preset, None, list(qc.overrides))
        if cfg.data.fixture:
            return None
        return int(load_manifest(cfg.data.dir)["splits"]["train"]["tokens"])
    except (UserError, OSError, KeyError, TypeError, ValueError):
        return None


def study(qc: QualityConfig) -> dict[str, Any]:
    """Run (or resume) the whole study and write the report; returns the analysis."""
    qc.validate()
    Path(qc.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(qc.out_dir) / "study.json").write_text(json.dumps(asdict(qc), indent=1))
    t0 = time.time()
    run_study(qc)
    if qc.mqar:
        from .mqar_study import run_grid

        grid = mqar_grid(qc)
        left = qc.deadline_s - (time.time() - t0)
        if qc.deadline_s and left < 30:
            log.warning("no time left for the MQAR lens before the deadline; it runs on the next invocation")
        else:
            grid.deadline_s = max(0.0, left) if qc.deadline_s else 0.0
            run_grid(grid)
    res = analyse(qc)
    write_report(res, Path(qc.out_dir))
    return res


def build_parser() -> argparse.ArgumentParser:
    """The ``ra quality`` options."""
    ap = argparse.ArgumentParser(prog="ra quality", description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of: {', '.join(ARMS)} (a subset runs "
                    "only those; the report covers what is finished)")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds; each arm runs once per seed (paired by seed)")
    ap.add_argument("--preset", default=None, help="training preset (default quality-gpu on CUDA, else "
                    "quality-cpu; quality-gpu-40m for the 40M-token study)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="training override applied to every run (e.g. budget.max_tokens=2000000)")
    ap.add_argument("--out", default="runs/quality", help="study directory: one run directory per arm and seed, and the report")
    ap.add_argument("--parallel", type=int, default=None, help="runs at once (default: 6 on CUDA, 1 on CPU)")
    ap.add_argument("--equal", choices=("tokens", "wallclock"), default="tokens",
                    help="compare arms at equal training tokens (default) or at equal wall-clock time (--wall-seconds)")
    ap.add_argument("--wall-seconds", type=float, default=0.0, help="with --equal wallclock: training seconds per run")
    ap.add_argument("--mqar", action="store_true", help="also run the MQAR probe's main cell per arm and seed")
    ap.add_argument("--mqar-steps", type=int, default=1000, help="with --mqar: training steps of each MQAR probe run")
    ap.add_argument("--run-timeout", type=float, default=0.0, help="seconds per training run (it resumes later)")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds for this invocation: running jobs stop then and resume on the next one (0 = none)")
    ap.add_argument("--prior", action="append", default=[], metavar="QUALITY_JSON",
                    help="an earlier study's quality.json, kept in the report as one row")
    ap.add_argument("--report-only", action="store_true", help="only analyse finished runs and write the report")
    ap.add_argument("--restore", default=None, metavar="QUALITY_JSON",
                    help="first write the finished runs recorded in this study's earlier report (its quality.json) "
                    "into --out, where their run directories are missing: the study resumes from its committed report")
    ap.add_argument("--device-label", default="", help="where the training runs ran (for a report made elsewhere)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``ra quality``: run or resume the study with live progress of every run, then print the report."""
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    try:
        qc = QualityConfig(arms=args.arms.split(","), seeds=[int(s) for s in args.seeds.split(",")],
                           preset=args.preset or ("quality-gpu" if cuda else "quality-cpu"),
                           overrides=args.overrides, out_dir=args.out, parallel=args.parallel or (6 if cuda else 1),
                           equal=args.equal, wall_seconds=args.wall_seconds, mqar=args.mqar,
                           mqar_steps=args.mqar_steps, run_timeout=args.run_timeout, deadline_s=args.deadline,
                           device_label=args.device_label, prior=args.prior)
        qc.validate()
        load_prior(qc.prior)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.restore:
        restore_runs(qc, args.restore)
    if args.report_only:
        res = analyse(qc)
        write_report(res, Path(qc.out_dir))
    else:
        with run_progress(qc):
            res = study(qc)
    print(markdown(res))
    return 0
