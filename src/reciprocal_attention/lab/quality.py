"""``ra quality``: does RA help? A paired, multi-seed study with controls (RA-SPEC section 5).

Arms differ only in the attention (``model.attn``): ``standard`` (baseline), ``seed``, ``ra``, ``ra_disc``,
``full`` and ``output_gate`` (a control that adds learned per-head gating without any reciprocal term). Seed ``s``
gives every arm the same shared-parameter init and the same data order, so differences are paired by seed.

Two lenses:
* language modelling on the offline corpus: final validation loss / perplexity at equal tokens (or equal
  wall-clock with ``--equal wallclock``), per-arm mean and std, paired differences against the baseline, and the
  noise floor: the baseline against itself with another seed. A claim of "better" needs a paired difference
  larger than the noise floor in every seed;
* multi-query associative recall (MQAR, :mod:`reciprocal_attention.lab.mqar`): accuracy per arm.

Runs are separate processes (several share one GPU: ``--parallel``), each in its own run directory; the study is
resumable: finished runs are kept, interrupted ones resume from their last checkpoint, and the report merges all.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import load_config, to_toml

log = logging.getLogger(__name__)

ARMS = ("standard", "seed", "ra", "ra_disc", "full", "output_gate")
BASELINE = "standard"


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
    mqar: bool = True
    mqar_steps: int = 300
    mqar_seq_len: int = 64
    mqar_kv: int = 8
    run_timeout: float = 0.0  # seconds per training process; 0 = none
    device_label: str = ""  # where the training runs ran, when the report is assembled elsewhere

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


def run_dir(qc: QualityConfig, arm: str, seed: int) -> Path:
    return Path(qc.out_dir) / "runs" / f"{arm}-s{seed}"


def run_overrides(qc: QualityConfig, arm: str, seed: int) -> list[str]:
    """The overrides that make one run of the study: attention arm, paired seeds, budget mode."""
    ov = list(qc.overrides) + [f"model.attn={arm}", f"system.seed={seed}", f"data.seed={seed}",
                               f"system.out_dir={run_dir(qc, arm, seed)}", "system.progress=false"]
    if qc.equal == "wallclock":
        ov += [f"budget.max_seconds={qc.wall_seconds}"]
    return ov


def _launch(qc: QualityConfig, arm: str, seed: int) -> subprocess.Popen | None:
    """Start (or resume) one training run as a subprocess; None if it already finished."""
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
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=open(d / "train.log", "a"), stderr=subprocess.STDOUT, env=env)


def run_study(qc: QualityConfig) -> None:
    """Run every (arm, seed) training job, ``parallel`` at a time; finished ones are skipped."""
    qc.validate()
    jobs = [(a, s) for s in qc.seeds for a in qc.arms]  # seed-major: a partial study still has whole pairs
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    failed = []
    while jobs or running:
        while jobs and len(running) < qc.parallel:
            arm, seed = jobs.pop(0)
            p = _launch(qc, arm, seed)
            if p is not None:
                running.append((arm, seed, p, time.time()))
                print(f"[quality] started {arm} seed {seed}", flush=True)
        time.sleep(0.5)
        for item in list(running):
            arm, seed, p, t0 = item
            rc = p.poll()
            if rc is None and qc.run_timeout and time.time() - t0 > qc.run_timeout:
                p.terminate()
                rc = p.wait()
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
# MQAR lens
# --------------------------------------------------------------------------------------------------------------

def run_mqar(qc: QualityConfig, arm: str, seed: int, device: torch.device) -> dict[str, Any]:
    """Train a small GPT with ``arm`` attention on MQAR for ``mqar_steps`` steps; held-out accuracy."""
    from ..model import GPT, GPTConfig
    from .mqar import IGNORE, MQARSpec, accuracy, make_batch

    out = Path(qc.out_dir) / "mqar" / f"{arm}-s{seed}.json"
    if out.exists():
        return json.loads(out.read_text())
    spec = MQARSpec(seq_len=qc.mqar_seq_len, n_kv=qc.mqar_kv, n_queries=qc.mqar_kv, n_keys=4 * qc.mqar_kv,
                    n_values=4 * qc.mqar_kv)
    # one model size on every device (fp32), so results from a GPU and a CPU are the same experiment
    mcfg = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=spec.seq_len, vocab_size=spec.vocab_size,
                     dropout=0.0, bias=True, attn=arm, ra_layers="all")
    model = GPT(mcfg, seed=seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(10_000 + seed)
    batch = 64
    t0 = time.time()
    for step in range(qc.mqar_steps):
        x, y = make_batch(spec, batch, gen)
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    test_gen = torch.Generator().manual_seed(99_999)  # the same held-out set for every arm and seed
    accs = []
    with torch.no_grad():
        for _ in range(4):
            x, y = make_batch(spec, 128, test_gen)
            logits, _ = model(x.to(device))
            accs.append(accuracy(logits.float().cpu(), y))
    res = {"arm": arm, "seed": seed, "accuracy": sum(accs) / len(accs), "steps": qc.mqar_steps,
           "final_train_loss": float(loss.detach()), "seconds": time.time() - t0, "spec": asdict(spec),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return res


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
        thr = noise["max"]
        if not diffs or thr is None or len(diffs) < len(qc.seeds):
            verdicts[a] = "incomplete: not every seed has a finished run of both arms"
        elif all(d < -thr for d in diffs.values()):
            verdicts[a] = f"better than {BASELINE}: lower loss in every seed by more than the noise floor ({thr:.4f})"
        elif all(d > thr for d in diffs.values()):
            verdicts[a] = f"worse than {BASELINE}: higher loss in every seed by more than the noise floor ({thr:.4f})"
        else:
            verdicts[a] = (f"no difference that the data support: paired differences "
                           f"{', '.join(f'{d:+.4f}' for d in diffs.values())} vs noise floor {thr:.4f}")
    mqar_dir = Path(qc.out_dir) / "mqar"
    mqar: dict[str, Any] = {}
    if mqar_dir.exists():
        for f in sorted(mqar_dir.glob("*.json")):
            r = json.loads(f.read_text())
            mqar.setdefault(r["arm"], {})[r["seed"]] = r["accuracy"]
    curves = {f"{a}-s{s}": runs[(a, s)]["curve"] for a in qc.arms for s in qc.seeds if runs[(a, s)]}
    any_run = next((r for r in runs.values() if r), {})
    return {"config": asdict(qc), "arms": arms, "noise_floor": noise, "verdicts": verdicts, "mqar": mqar,
            "curves": curves, "device": any_run.get("device"), "dtype": any_run.get("dtype"),
            "params": any_run.get("params"), "torch": torch.__version__,
            "gpu": qc.device_label or (torch.cuda.get_device_name() if torch.cuda.is_available() else None),
            "complete": all(runs.values())}


def verdict_sentence(res: dict[str, Any]) -> str:
    """One sentence that says only what the numbers support."""
    better = [a for a, v in res["verdicts"].items() if v.startswith("better")]
    worse = [a for a, v in res["verdicts"].items() if v.startswith("worse")]
    if not res["complete"]:
        return "The study is incomplete; no verdict."
    n = len(res["config"]["seeds"])
    parts = []
    parts.append(f"better than the baseline in all {n} seeds beyond the noise floor: {', '.join(better)}" if better
                 else f"no arm beat the baseline beyond the noise floor in all {n} seeds")
    if worse:
        parts.append(f"worse in every seed: {', '.join(worse)}")
    return "At this scale, " + "; ".join(parts) + "."


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _arm_row(arm: str, st: dict[str, Any], verdict: str) -> str:
    """One markdown table row of per-arm statistics."""
    if st["mean"] is None:
        return f"| {arm} | no finished run | | | | | | |"
    diffs = ", ".join(f"{d:+.4f}" for d in st.get("paired_diff", {}).values()) or "-"
    rel = st.get("paired_diff_rel_mean")
    rel_s = "-" if rel is None else f"{100 * rel:+.2f}%"
    return (f"| {arm} | {st['mean']:.4f} | {_num(st['std'], '.4f')} | {st['ppl_mean']:.2f} | {diffs} | {rel_s} | "
            f"{_num(st['tokens_per_s_mean'], ',.0f')} | {verdict} |")


def markdown(res: dict[str, Any]) -> str:
    qc = res["config"]
    nf = res["noise_floor"]
    lines = ["# RA quality study", "",
             f"Device: {res.get('gpu') or res.get('device')}; dtype {res.get('dtype')}; report assembled with torch "
             f"{res['torch']}; "
             f"training preset `{qc['preset']}` with overrides {qc['overrides'] or 'none'}; model parameters "
             f"{res.get('params')}; seeds {qc['seeds']} (paired: same init of shared weights, same data order); "
             f"equal {qc['equal']}.", "",
             f"**Verdict:** {verdict_sentence(res)}", "",
             f"Noise floor (baseline vs baseline with another seed, |diff| of final val loss): mean "
             f"{nf['mean'] if nf['mean'] is None else round(nf['mean'], 4)}, max "
             f"{nf['max'] if nf['max'] is None else round(nf['max'], 4)}.", "",
             "| arm | val loss mean | std | ppl | paired diff vs standard (per seed) | mean rel diff | tokens/s | "
             "verdict |", "|---|---|---|---|---|---|---|---|"]
    for a, st in res["arms"].items():
        lines.append(_arm_row(a, st, res["verdicts"].get(a, "baseline")))
    lines += ["", "tokens/s is per training process while several runs share one GPU: a record of the study, not a "
              "speed comparison (see `ra bench`)."]
    if res["mqar"]:
        base = list(res["mqar"].get(BASELINE, {}).values())
        spread = f"{max(base) - min(base):.3f}" if len(base) > 1 else "n/a"
        lines += ["", "## MQAR accuracy (held-out, same test set for every arm)", "",
                  f"Spread of the baseline across seeds (its noise floor): {spread}.", "",
                  "| arm | accuracy per seed | mean |", "|---|---|---|"]
        for a, d in res["mqar"].items():
            lines.append(f"| {a} | {', '.join(f'{v:.3f}' for v in d.values())} | {statistics.fmean(d.values()):.3f} |")
    lines += ["", "Loss curves: `quality.png`. Raw numbers: `quality.json`."]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(zip(ARMS, ["k", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]))
    for name, curve in res["curves"].items():
        arm = name.rsplit("-s", 1)[0]
        if curve:
            t, l = zip(*curve)
            ax.plot(t, l, color=colors.get(arm), alpha=0.7, lw=1, label=arm if name.endswith("-s" + str(
                res["config"]["seeds"][0])) else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("val loss")
    ax.set_title("validation loss (each line one seed)")
    ax.legend()
    arms = [a for a in res["arms"] if a != BASELINE and res["arms"][a].get("paired_diff")]
    for i, a in enumerate(arms):
        d = list(res["arms"][a]["paired_diff"].values())
        ax2.scatter([i] * len(d), d, color=colors.get(a))
    nf = res["noise_floor"]["max"]
    if nf is not None:
        ax2.axhspan(-nf, nf, color="grey", alpha=0.2, label="noise floor (baseline vs baseline)")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(range(len(arms)), arms)
    ax2.set_ylabel("final val loss - baseline (paired by seed)")
    ax2.legend()
    fig.suptitle(f"RA quality study - {res.get('gpu') or res.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(res, indent=1))
    (out / "quality.md").write_text(markdown(res))
    plot(res, out / "quality.png")


def study(qc: QualityConfig) -> dict[str, Any]:
    """Run (or resume) the whole study and write the report; returns the analysis."""
    qc.validate()
    Path(qc.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(qc.out_dir) / "study.json").write_text(json.dumps(asdict(qc), indent=1))
    run_study(qc)
    if qc.mqar:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for s in qc.seeds:
            for a in qc.arms:
                r = run_mqar(qc, a, s, device)
                print(f"[quality] MQAR {a} seed {s}: accuracy {r['accuracy']:.3f}", flush=True)
    res = analyse(qc)
    write_report(res, Path(qc.out_dir))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ra quality", description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of: {', '.join(ARMS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--preset", default=None, help="training preset (default quality-gpu on CUDA, else quality-cpu)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="training override applied to every run (e.g. budget.max_tokens=2000000)")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--parallel", type=int, default=None, help="runs at once (default: 6 on CUDA, 1 on CPU)")
    ap.add_argument("--equal", choices=("tokens", "wallclock"), default="tokens")
    ap.add_argument("--wall-seconds", type=float, default=0.0)
    ap.add_argument("--no-mqar", action="store_true")
    ap.add_argument("--mqar-steps", type=int, default=300)
    ap.add_argument("--run-timeout", type=float, default=0.0)
    ap.add_argument("--report-only", action="store_true", help="only analyse finished runs and write the report")
    ap.add_argument("--device-label", default="", help="where the training runs ran (for a report made elsewhere)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    qc = QualityConfig(arms=args.arms.split(","), seeds=[int(s) for s in args.seeds.split(",")],
                       preset=args.preset or ("quality-gpu" if cuda else "quality-cpu"), overrides=args.overrides,
                       out_dir=args.out, parallel=args.parallel or (6 if cuda else 1), equal=args.equal,
                       wall_seconds=args.wall_seconds, mqar=not args.no_mqar, mqar_steps=args.mqar_steps,
                       run_timeout=args.run_timeout, device_label=args.device_label)
    try:
        qc.validate()
    except ValueError as e:
        ap.error(str(e))
    if args.report_only:
        res = analyse(qc)
        write_report(res, Path(qc.out_dir))
    else:
        res = study(qc)
    print(markdown(res))
    return 0
