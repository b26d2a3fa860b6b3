"""The equal-wall-clock reading of an equal-tokens study.

Every run of the study trains the same number of tokens. An arm that is slower per token would, in the wall-clock
time the baseline took, have seen fewer: ``tokens * (arm's tokens/s) / (baseline's tokens/s)``. Its loss at equal
wall clock is its validation curve at that token count (linear between evaluations). The speeds are the runs' own
training tokens/s in the same seed, measured while the study's runs shared the device (each run got its share of
it as the others did), so a per-seed pair is timed under the same conditions; runs that finish first leave the
card to the rest, which flatters the slowest arms, so the reading errs towards "no difference" (a solo benchmark
such as ``ra bench --model`` is the speed comparison). An arm faster than the baseline
would have trained beyond its last evaluation: its final loss is used and the row is marked ``capped`` (the
reading then favours the baseline). Speeds from different cards (``device_name`` in the runs' summaries) do not
compare: such a seed has no equal-wall-clock reading, and the arm's verdict says so.
"""

from __future__ import annotations

import statistics
from typing import Any

from .quality_report import paired_verdict


def loss_at_tokens(curve: list[tuple[int, float]], tokens: float) -> float:
    """The validation loss of ``curve`` (``(tokens, loss)`` pairs) at ``tokens``, linear between evaluations."""
    pts = sorted(curve)
    if not pts:
        raise ValueError("the run has no evaluation to read a loss from")
    if tokens <= pts[0][0]:
        return pts[0][1]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if tokens <= t1:
            return l0 + (l1 - l0) * (tokens - t0) / (t1 - t0)
    return pts[-1][1]


def equal_wallclock(runs: dict[tuple[str, int], dict[str, Any] | None], arms: list[str], seeds: list[int],
                    baseline: str, noise: float | None) -> dict[str, Any]:
    """Per arm: the speed ratio, the tokens and loss at the baseline's wall-clock time, the paired differences
    against the baseline's final loss, and a verdict against the same noise floor as the equal-tokens one."""
    out: dict[str, Any] = {}
    for a in arms:
        if a == baseline:
            continue
        rows, other_card = {}, {}
        for s in seeds:
            b, r = runs.get((baseline, s)), runs.get((a, s))
            if not (b and r and b.get("tokens_per_s") and r.get("tokens_per_s") and r.get("curve")):
                continue
            if b.get("device_name") != r.get("device_name"):
                other_card[s] = tuple(x.get("device_name") or "an unrecorded card" for x in (b, r))
                continue
            speed = r["tokens_per_s"] / b["tokens_per_s"]
            tokens = b["tokens"] * speed
            capped = tokens >= r["tokens"]
            loss = r["final_val_loss"] if capped else loss_at_tokens(r["curve"], tokens)
            rows[s] = {"speed_vs_baseline": speed, "tokens": min(tokens, r["tokens"]), "capped": capped,
                       "loss": loss, "diff": loss - b["final_val_loss"]}
        diffs = [row["diff"] for row in rows.values()]
        verdict = paired_verdict(diffs, len(seeds), noise, baseline, " at equal wall clock")
        if other_card:
            verdict = ("no reading: " + "; ".join(f"seed {s} trained {baseline} on {cb} and {a} on {ca}"
                                                  for s, (cb, ca) in other_card.items())
                       + " (speeds from different cards do not compare)")
        speeds = [r["speed_vs_baseline"] for r in rows.values()]
        out[a] = {"seeds": rows, "other_card": sorted(other_card),
                  "speed_mean": statistics.fmean(speeds) if speeds else None,
                  "paired_diff_mean": statistics.fmean(diffs) if diffs else None, "verdict": verdict}
    return out
