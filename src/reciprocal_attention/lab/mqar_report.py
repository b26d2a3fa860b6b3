"""The MQAR grid's report: its records (``mqar.json``), the table of accuracy and steps to recall per cell and arm
with paired differences (``mqar.md``), and the plot against width and number of pairs (``mqar.png``)."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from .mqar import MQARRun

ARMS = ("standard", "ra", "ra_disc_channel", "full", "output_gate")  # the grid's arms, in order of interest
VALID_ARMS = ARMS + ("seed", "ra_disc")  # also accepted (the LM study's other arms)
BASELINE = "standard"

RECORD_KEYS = ("arm", "seed", "d_model", "seq_len", "n_kv", "lr", "steps", "accuracy", "best_lr", "steps_run",
               "steps_to_solve", "curve", "vocab_size", "tie_embeddings", "batch_size", "seconds", "device")
SOLVED = 0.9  # held-out accuracy that counts as recall (a run's first evaluation at or above it: steps_to_solve)
CELL_KEYS = ("d_model", "seq_len", "n_kv", "steps", "vocab_size", "tie_embeddings", "batch_size")


def _best_lr(by_lr: dict[float, dict[int, float]]) -> float:
    """The rate of the highest mean accuracy over the seeds every rate has (all of a rate's seeds if none shared)."""
    shared = set.intersection(*(set(acc) for acc in by_lr.values()))

    def mean(lr: float) -> float:
        return statistics.fmean(a for s, a in by_lr[lr].items() if s in shared or not shared)
    return max(sorted(by_lr), key=mean)


def load_records(out: Path) -> list[dict[str, Any]]:
    """Every finished run under ``out/runs``, with ``best_lr`` marked: per (arm, cell) the learning rate of the
    highest mean accuracy over the seeds finished at every rate tried (ties: the smaller rate), so a rate with
    fewer seeds so far is compared on the same seeds."""
    recs = [{"tie_embeddings": False, "curve": [], "batch_size": None, **json.loads(f.read_text())}
            for f in sorted((out / "runs").glob("*.json"))]
    for r in recs:
        r["steps_to_solve"] = next((step for step, acc in r.get("curve", []) if acc >= SOLVED), None)
    groups: dict[tuple, dict[float, dict[int, float]]] = {}
    for r in recs:
        groups.setdefault((r["arm"], *(r[k] for k in CELL_KEYS)), {}).setdefault(r["lr"], {})[r["seed"]] = r["accuracy"]
    best = {g: _best_lr(by_lr) for g, by_lr in groups.items()}
    for r in recs:
        r["best_lr"] = r["lr"] == best[(r["arm"], *(r[k] for k in CELL_KEYS))]
    return [{k: r[k] for k in RECORD_KEYS} for r in recs]


def cell_table(recs: list[dict[str, Any]], key: str = "accuracy") -> dict[tuple, dict[str, dict[int, Any]]]:
    """``{cell: {arm: {seed: record[key] at the arm's best lr}}}`` (``key``: accuracy, steps_to_solve)."""
    table: dict[tuple, dict[str, dict[int, Any]]] = {}
    for r in recs:
        if r["best_lr"]:
            table.setdefault(tuple(r[k] for k in CELL_KEYS), {}).setdefault(r["arm"], {})[r["seed"]] = r[key]
    return table


def _cell_text(by_seed: dict[int, float] | None, base: dict[int, float] | None) -> str:
    if not by_seed:
        return "-"
    v = list(by_seed.values())
    s = f"{statistics.fmean(v):.3f} [{min(v):.2f}-{max(v):.2f}] n={len(v)}, {sum(a >= SOLVED for a in v)} solved"
    if base is not None and by_seed is not base:
        diffs = [by_seed[k] - base[k] for k in sorted(by_seed) if k in base]
        if diffs:
            s += f"; vs {BASELINE}: " + " ".join(f"{d:+.2f}" for d in diffs)
    return s


def report_arms(recs: list[dict[str, Any]]) -> list[str]:
    """The arms of ``recs``: the presets in :data:`VALID_ARMS` order, then arms with an override as they come."""
    seen = list(dict.fromkeys(r["arm"] for r in recs))
    return [a for a in VALID_ARMS if a in seen] + [a for a in seen if a not in VALID_ARMS]


def markdown(recs: list[dict[str, Any]], remaining: list[MQARRun] | None = None) -> str:
    """The report: per cell and arm, accuracy at the arm's best learning rate, seed range, paired differences."""
    table = cell_table(recs)
    arms = report_arms(recs)
    devices = sorted({r["device"] for r in recs})
    lines = ["# MQAR: associative recall per arm", "",
             f"Device: {', '.join(devices) or '-'}. 2-layer probe models (PyTorch init, untied head); Zoology-style "
             "task (keys and values each half of the vocabulary, as many queries as pairs). Each entry: mean "
             "held-out accuracy over seeds at the arm's best learning rate, [min-max] over seeds, the number of "
             f"seeds, how many reached {SOLVED} (learning to recall is a sudden transition whose step varies with "
             f"the seed, so a cell's mean mixes solved and unsolved runs), and the paired difference against "
             f"`{BASELINE}` per seed (same init of shared weights, same data). Without recall a model can still "
             "name one of the sequence's values (about 1/n_kv). The region that can show a difference is where the "
             "baseline is between 0.3 and 0.9.", "",
             "| d_model | seq_len | n_kv | steps | vocab | tied head | batch | " + " | ".join(arms) + " |",
             "|---" * (7 + len(arms)) + "|"]
    for cell in sorted(table, key=lambda c: (c[2], c[1], c[0])):
        base = table[cell].get(BASELINE)
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cell) + " | "
                     + " | ".join(_cell_text(table[cell].get(a), base) for a in arms) + " |")
    steps = cell_table(recs, "steps_to_solve")
    rows = []
    for cell in sorted(steps, key=lambda c: (c[2], c[1], c[0])):
        if not any(v is not None for by_seed in steps[cell].values() for v in by_seed.values()):
            continue  # no run of the cell got there
        cells = [", ".join("-" if v is None else str(v) for _, v in sorted(steps[cell].get(a, {}).items())) or "-"
                 for a in arms]
        rows.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["", f"Steps to reach {SOLVED} held-out accuracy, per seed in seed order (`-`: not within the "
                  "run's steps), at each arm's best learning rate; a measure of how soon recall is learned:", "",
                  "| d_model | seq_len | n_kv | " + " | ".join(arms) + " |", "|---" * (3 + len(arms)) + "|", *rows]
    else:
        lines += ["", f"No run reached {SOLVED} held-out accuracy within its steps."]
    lrs = sorted({r["lr"] for r in recs})
    lines += ["", f"Learning rates tried: {', '.join(f'{lr:g}' for lr in lrs) or '-'}; best per arm and cell "
              "is marked `best_lr` in `mqar.json`. Plot: `mqar.png`."]
    lines += _lr_table(recs, arms)
    if remaining is not None:
        lines += ["", f"**Remaining:** {len(remaining)} runs of the grid have no result yet"
                  + (": " + ", ".join(r.key for r in remaining[:20]) + (" ..." if len(remaining) > 20 else "")
                     if remaining else ".")]
    return "\n".join(lines) + "\n"


def _lr_table(recs: list[dict[str, Any]], arms: list[str]) -> list[str]:
    """Where a cell tried several learning rates: per rate and arm, the mean accuracy, seeds and solved seeds."""
    by: dict[tuple, dict[float, dict[str, list[float]]]] = {}
    for r in recs:
        by.setdefault(tuple(r[k] for k in CELL_KEYS), {}).setdefault(r["lr"], {}).setdefault(
            r["arm"], []).append(r["accuracy"])
    swept = {cell: rates for cell, rates in by.items() if len(rates) > 1}
    if not swept:
        return []
    out = ["", "Every learning rate of the cells that tried several: mean accuracy (seeds, solved):", "",
           "| d_model | seq_len | n_kv | steps | vocab | lr | " + " | ".join(arms) + " |", "|---" * (6 + len(arms)) + "|"]
    for cell in sorted(swept, key=lambda c: (c[2], c[1], c[0])):
        for lr in sorted(swept[cell]):
            accs = swept[cell][lr]
            cells = [f"{statistics.fmean(accs[a]):.3f} ({len(accs[a])}, {sum(x >= SOLVED for x in accs[a])})"
                     if a in accs else "-" for a in arms]
            out.append(f"| {' | '.join(str(c) for c in cell[:5])} | {lr:g} | " + " | ".join(cells) + " |")
    return out


def plot(recs: list[dict[str, Any]], width_task: tuple[int, int], kv_width: int, path: Path) -> None:
    """Accuracy vs width at the width task, and vs n_kv at ``kv_width``; mean line, seed min-max as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = cell_table(recs)
    arms = report_arms(recs)
    palette = ["k", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:red", "tab:cyan", "tab:brown",
               "tab:olive", "tab:pink", "tab:gray"]
    colors = dict(zip(VALID_ARMS + tuple(a for a in arms if a not in VALID_ARMS), itertools.cycle(palette)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    seq_w, kv_w = width_task
    panels = [(axes[0], lambda c: c[1] == seq_w and c[2] == kv_w, 0, "d_model",
               f"accuracy vs width (seq {seq_w}, {kv_w} pairs)"),
              (axes[1], lambda c: c[0] == kv_width, 2, "key-value pairs",
               f"accuracy vs pairs (width {kv_width})")]
    for ax, keep, xi, xlabel, title in panels:
        if not any(keep(c) for c in table):
            ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
        for i, arm in enumerate(arms):
            pts = sorted((c[xi], list(v[arm].values())) for c, v in table.items() if keep(c) and arm in v)
            if not pts:
                continue
            xs = [p[0] * (1 + 0.02 * (i - 2)) for p in pts]  # a small offset so seed ranges don't overlap
            means = [statistics.fmean(p[1]) for p in pts]
            err = [[m - min(p[1]) for m, p in zip(means, pts)], [max(p[1]) - m for m, p in zip(means, pts)]]
            ax.errorbar(xs, means, yerr=err, color=colors[arm], marker="o", capsize=3, label=arm)
        ax.set_xscale("log", base=2)
        xs_all = sorted({c[xi] for c in table if keep(c)})
        if xs_all:  # the cells' own values as ticks, and some room around a single one
            ax.set_xlim(xs_all[0] / 1.4, xs_all[-1] * 1.4)
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
            ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.axhspan(0.3, 0.9, color="grey", alpha=0.1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy (best lr; bars: seed min-max)")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
