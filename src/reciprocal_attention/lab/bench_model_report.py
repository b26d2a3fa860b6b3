"""The whole-model benchmark's records (``model.json``): their markdown table, their plot, how a new run's
records replace the ones they measure again (``ra bench --model gpt2 --model-merge``), and how the records of
several processes become one (``--model-processes``)."""

from __future__ import annotations

import statistics
from typing import Any


def render_markdown(records: list[dict[str, Any]]) -> str:
    """The model-level table: training step ratios per mode and shape, then decoding."""
    if not records:
        return "No records.\n"
    v = records[0]
    lines = ["# Whole-model benchmark: GPT-2 training step and decoding", "",
             f"{v['device']}, torch {v['torch']}, triton {v['triton']}. Ratios are paired against the baseline "
             "in the same process (median of per-round ratios, min-max in brackets; measured in several processes: "
             "the median of the processes' ratios, each listed). Training step = forward + "
             "backward + fused AdamW + zero_grad, bf16 autocast, fp32 parameters.", "",
             "| model | preset | mode | B x T | ms (median) | ratio vs baseline | peak memory vs baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        if r["kind"] != "train_step":
            continue
        mem = (f"{r['peak_mem_bytes'] / r['baseline_peak_mem_bytes']:.3f}x"
               if r.get("peak_mem_bytes") and r.get("baseline_peak_mem_bytes") else "-")
        per_process = (" (processes: " + ", ".join(f"{x:.3f}" for x in r["process_ratios"]) + ")"
                       if len(r.get("process_ratios", [])) > 1 else "")
        lines.append(f"| {r['model']} | {r['preset']} | {r['mode']} | {r['B']} x {r['T']} | {r['ms_median']:.2f} | "
                     f"**{r['ratio_vs_baseline']:.3f}x** [{r['ratio_min']:.3f}-{r['ratio_max']:.3f}]{per_process} | "
                     f"{mem} |")
    dec = [r for r in records if r["kind"] == "decode"]
    if dec:
        lines += ["", "| decoding (greedy, KV cache) | preset | B | new tokens | tokens/s | baseline tokens/s | ratio |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['preset']} | {r['B']} | {r['T']} | {r['tokens_per_s']:.0f} | "
                  f"{r['baseline_tokens_per_s']:.0f} | {r['ratio_vs_baseline']:.3f}x"
                  + (f" [{r['ratio_min']:.3f}-{r['ratio_max']:.3f}]" if "ratio_min" in r else "") + " |" for r in dec]
    return "\n".join(lines) + "\n"


def render_png(records: list[dict[str, Any]], path: Any) -> None:
    """Bar chart of training-step ratios (linear axis around 1.0x, values labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["kind"] == "train_step"]
    if not rows:
        return
    labels = [f"{r['model']}/{r['preset']}\n{r['mode']} {r['B']}x{r['T']}" for r in rows]
    vals = [r["ratio_vs_baseline"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 4.5))
    bars = ax.bar(range(len(rows)), vals, color=["#4c72b0" if r["mode"] == "eager" else "#dd8452" for r in rows])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylim(min(0.9, min(vals) - 0.02), max(1.1, max(vals) + 0.05))
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("step time / baseline step time")
    ax.set_title("GPT-2 training step, RA vs baseline (paired)")
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record_key(r: dict[str, Any]) -> tuple:
    """What a record measures: two records with one key are the same claim (the newer one is current)."""
    return r["kind"], r["model"], r["preset"], r["mode"], r["B"], r["T"]


def merge_records(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with every record ``new`` measures again replaced, in ``old``'s order, then ``new``'s other records."""
    fresh = {record_key(r): r for r in new}
    out = [fresh.pop(record_key(r), r) for r in old]
    return out + [r for r in new if record_key(r) in fresh]


def combine_processes(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per key from the records of several processes that measured the same arms: the medians of the
    processes' medians (ratio, milliseconds, tokens/s, peak memory), the extremes of their ranges, and each
    process's ratio in ``process_ratios``. The host-bound modes vary between processes more than between rounds
    of one process, so one process's median is not the answer there."""
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for records in runs:
        for r in records:
            by_key.setdefault(record_key(r), []).append(r)
    out = []
    for group in by_key.values():
        rec = dict(group[0])
        for k in ("ratio_vs_baseline", "ms_median", "baseline_ms_median", "tokens_per_s", "baseline_tokens_per_s",
                  "peak_mem_bytes", "baseline_peak_mem_bytes"):
            vals = [r[k] for r in group if r.get(k) is not None]
            if vals:
                rec[k] = statistics.median(vals)
        for k, pick in (("ratio_min", min), ("ms_min", min), ("ratio_max", max), ("ms_max", max)):
            vals = [r[k] for r in group if r.get(k) is not None]
            if vals:
                rec[k] = pick(vals)
        rec["process_ratios"] = [r["ratio_vs_baseline"] for r in group]
        rec["processes"] = len(group)
        out.append(rec)
    return out
