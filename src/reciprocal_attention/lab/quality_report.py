"""The quality study's report: the paired verdict rule, ``quality.md`` (verdict, per-arm table, earlier studies as
rows, what remains) and ``quality.png`` (validation curves and paired differences), from
:func:`reciprocal_attention.lab.quality.analyse`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

BASELINE = "standard"
COLORS = {"standard": "k", "seed": "tab:red", "ra": "tab:blue", "ra_disc": "tab:green", "full": "tab:purple",
          "output_gate": "tab:orange"}


def paired_verdict(diffs: list[float], n_seeds: int, noise: float | None, baseline: str, reading: str = "") -> str:
    """The study's rule for one arm: "better" or "worse" than the baseline only when its paired loss difference is
    beyond the noise floor (the baseline against itself across seeds) in every seed; ``reading`` names the
    comparison (e.g. " at equal wall clock")."""
    if len(diffs) < n_seeds or not diffs:
        return "incomplete: not every seed has a finished run of both arms"
    if noise is None:
        return f"no verdict: the noise floor needs finished {baseline} runs of at least 2 seeds"
    if all(d < -noise for d in diffs):
        return f"better than {baseline}{reading}: lower loss in every seed by more than the noise floor ({noise:.4f})"
    if all(d > noise for d in diffs):
        return f"worse than {baseline}{reading}: higher loss in every seed by more than the noise floor ({noise:.4f})"
    return (f"no difference that the data support{reading}: paired differences "
            f"{', '.join(f'{d:+.4f}' for d in diffs)} vs noise floor {noise:.4f}")


def verdict_sentence(res: dict[str, Any]) -> str:
    """One sentence that says only what the numbers support."""
    better = [a for a, v in res["verdicts"].items() if v.startswith("better")]
    worse = [a for a, v in res["verdicts"].items() if v.startswith("worse")]
    if not res["complete"]:
        done = {a: v.split(":")[0] for a, v in res["verdicts"].items() if not v.startswith("incomplete")}
        if not done:
            return "The study is incomplete; no verdict."
        n_left = len(res.get("remaining", []))
        left = "1 run remains" if n_left == 1 else f"{n_left} runs remain"
        return (f"The study is incomplete ({left}); arms with every seed finished: "
                + "; ".join(f"{a}, {v}" for a, v in done.items()) + ".")
    if res["verdicts"] and all(v.startswith("no verdict") for v in res["verdicts"].values()):
        return "No verdict: the noise floor needs the baseline trained with at least 2 seeds."
    n = len(res["config"]["seeds"])
    parts = [f"better than the baseline in all {n} seeds beyond the noise floor: {', '.join(better)}" if better
             else f"no arm beat the baseline beyond the noise floor in all {n} seeds"]
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


def study_row(res: dict[str, Any]) -> dict[str, Any]:
    """A study reduced to one row: tokens per run, per-arm mean loss and paired difference, verdict, device."""
    tokens = res.get("tokens_per_run")
    if tokens is None:  # reports written before tokens_per_run existed: the runs' own token counts
        counts = [t for st in res["arms"].values() for t in st.get("tokens", {}).values()]
        tokens = max(counts) if counts else None
    return {"tokens_per_run": tokens, "params": res.get("params"), "device": res.get("gpu") or res.get("device"),
            "seeds": res["config"]["seeds"], "verdict": verdict_sentence(res),
            "arms": {a: {"mean": st["mean"], "paired_diff_mean": st.get("paired_diff_mean")}
                     for a, st in res["arms"].items()}}


def load_prior(paths: list[str]) -> list[dict[str, Any]]:
    """Rows of earlier studies from their ``quality.json`` (and the rows those already carried)."""
    rows: list[dict[str, Any]] = []
    for p in paths:
        try:
            old = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"prior must name a readable quality.json; {p}: {e}") from None
        rows += old.get("prior_studies", [])
        rows.append(old if "verdict" in old and "arms" in old and "config" not in old else study_row(old))
    return rows


def _prior_table(rows: list[dict[str, Any]], arms: list[str]) -> list[str]:
    out = ["", "## Earlier studies (one row each: mean final val loss per arm, mean paired diff vs standard)", "",
           "| tokens per run | params | seeds | " + " | ".join(arms) + " | verdict |", "|---" * (len(arms) + 4) + "|"]
    for r in rows:
        cells = []
        for a in arms:
            st = r["arms"].get(a)
            if not st or st["mean"] is None:
                cells.append("-")
            else:
                d = st.get("paired_diff_mean")
                cells.append(f"{st['mean']:.4f}" + ("" if d is None else f" ({d:+.4f})"))
        out.append(f"| {_num(r['tokens_per_run'], ',')} | {_num(r.get('params'), ',')} | {r['seeds']} | "
                   + " | ".join(cells) + f" | {r['verdict']} |")
    return out


def _wallclock_table(wc: dict[str, Any]) -> list[str]:
    """The equal-wall-clock reading (:mod:`.quality_wallclock`): per arm and seed, its speed against the baseline's
    in the same seed, the tokens it would have trained in the baseline's time, its loss there, the difference."""
    out = ["", f"## Equal wall clock (read from the equal-tokens runs: each arm's loss after the tokens it trains in "
           f"the time {BASELINE} took, at its measured tokens/s against {BASELINE}'s in the same seed; "
           "`capped`: faster than the baseline, its final loss)", "",
           "| arm | speed vs standard (per seed) | tokens at equal time (per seed) | paired diff vs standard "
           "(per seed) | verdict |", "|---|---|---|---|---|"]
    for arm, w in wc.items():
        rows = list(w["seeds"].values())
        speeds = ", ".join(f"{r['speed_vs_baseline']:.3f}" for r in rows) or "-"
        tokens = ", ".join(f"{r['tokens']:,.0f}" + (" capped" if r["capped"] else "") for r in rows) or "-"
        diffs = ", ".join(f"{r['diff']:+.4f}" for r in rows) or "-"
        out.append(f"| {arm} | {speeds} | {tokens} | {diffs} | {w['verdict']} |")
    return out


def _cards(res: dict[str, Any]) -> list[str]:
    """A line naming the card of each run when the runs trained on more than one kind."""
    cards = res.get("cards") or {}
    if len(cards) < 2:
        return []
    return ["Runs trained on several kinds of card: " + "; ".join(f"{c} ({', '.join(r)})" for c, r in cards.items())
            + ".", ""]


def _passes(res: dict[str, Any]) -> str:
    """`` (N passes over the T-token training split)`` when both counts are known, else nothing."""
    tokens, train = res.get("tokens_per_run"), res.get("train_tokens")
    if not tokens or not train:
        return ""
    return f" ({tokens / train:.1f} passes over the {train:,}-token training split)"


def markdown(res: dict[str, Any]) -> str:
    """The study's report as markdown."""
    qc = res["config"]
    nf = res["noise_floor"]
    on_gpu = bool(res.get("gpu")) or str(res.get("device", "")).startswith("cuda")
    lines = ["# RA quality study", "",
             f"Device: {res.get('gpu') or res.get('device')}; dtype {res.get('dtype')}; report assembled with torch "
             f"{res['torch']}; training preset `{qc['preset']}` with overrides {qc['overrides'] or 'none'}; model "
             f"parameters {res.get('params')}; tokens per run {_num(res.get('tokens_per_run'), ',')}"
             f"{_passes(res)}; seeds "
             f"{qc['seeds']} (paired: same init of shared weights, same data order); equal {qc['equal']}.", "",
             *_cards(res), f"**Verdict:** {verdict_sentence(res)}", "",
             f"Noise floor (baseline vs baseline with another seed, |diff| of final val loss): mean "
             f"{_num(nf['mean'], '.4f')}, max {_num(nf['max'], '.4f')}.", "",
             "| arm | val loss mean | std | ppl | paired diff vs standard (per seed) | mean rel diff | tokens/s | "
             "verdict |", "|---|---|---|---|---|---|---|---|"]
    for a, st in res["arms"].items():
        lines.append(_arm_row(a, st, res["verdicts"].get(a, "baseline")))
    share = "several runs share one GPU" if on_gpu else "several runs share the CPU cores"
    lines += ["", f"tokens/s is per training process while {share}: a record of the study, not a speed comparison "
              "(see `ra bench`)."]
    if res.get("wallclock"):
        lines += _wallclock_table(res["wallclock"])
    if res.get("remaining"):
        lines += ["", f"**What remains:** {len(res['remaining'])} runs have no finished result: "
                  + ", ".join(res["remaining"]) + ". Rerun the same command with the same `--out` to resume them."]
    if res.get("mqar"):
        lines += ["", "## MQAR (the probe's main cell; the full grid is `python -m reciprocal_attention.lab."
                  "mqar_study`)", "", "| arm | accuracy per seed | mean |", "|---|---|---|"]
        for a, d in res["mqar"].items():
            lines.append(f"| {a} | {', '.join(f'{v:.3f}' for v in d.values())} | {statistics.fmean(d.values()):.3f} |")
    if res.get("prior_studies"):
        lines += _prior_table(res["prior_studies"], list(res["arms"]))
    lines += ["", "Loss curves: `quality.png`. Raw numbers: `quality.json`."]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """Validation-loss curves per run, and the paired differences against the noise-floor band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    first = "-s" + str(res["config"]["seeds"][0])
    for name, curve in res["curves"].items():
        arm = name.rsplit("-s", 1)[0]
        if curve:
            t, loss = zip(*curve)
            ax.plot(t, loss, color=COLORS.get(arm), alpha=0.7, lw=1, label=arm if name.endswith(first) else None)
    ax.set_xlabel("tokens")
    ax.set_ylabel("val loss")
    ax.set_title("validation loss (each line one seed)")
    ax.legend()
    late = [loss for c in res["curves"].values() if c for t, loss in c if t >= 0.2 * c[-1][0]]
    if late:  # the first steps' losses (~11 nats) would flatten where the arms differ: show the last 80%
        lo, hi = min(late), max(late)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    arms = [a for a in res["arms"] if a != BASELINE and res["arms"][a].get("paired_diff")]
    for i, a in enumerate(arms):
        d = list(res["arms"][a]["paired_diff"].values())
        ax2.scatter([i] * len(d), d, color=COLORS.get(a))
    nf = res["noise_floor"]["max"]
    if nf is not None:
        ax2.axhspan(-nf, nf, color="grey", alpha=0.2, label="noise floor (baseline vs baseline)")
        ax2.legend(loc="lower right")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(range(len(arms)), arms)
    ax2.set_ylabel("final val loss - baseline (paired by seed)")
    fig.suptitle(f"RA quality study - {res.get('gpu') or res.get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(res: dict[str, Any], out: Path) -> None:
    """``quality.json``, ``quality.md`` and ``quality.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(res, indent=1))
    (out / "quality.md").write_text(markdown(res))
    plot(res, out / "quality.png")
