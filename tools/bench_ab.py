"""Two block-bench runs of one GPU job side by side (stage ``bench_ab``): another commit's code against this tree.

    python tools/bench_ab.py PREV_JSON NEW_JSON OUT_MD [--prev-label 8786a97] [--new-label HEAD]

For every RA arm in both (same impl, SDPA backend, shape, width, mode and pass) it lists each run's ratio to its own
baseline (timed in the same process) and their relative difference; the baseline's own ms in both runs shows whether
the card drifted between them. Exits 1 when an arm got slower by more than ``--tolerance`` (default 1%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _key(r: dict[str, Any]) -> tuple:
    """One row of a block bench: the seed's table times one arm at several shares of RA heads."""
    return (r["impl"], r.get("heads_pct", 100), r.get("sdpa"), r["B"], r["T"], r["C"], r["mode"], r["pass"])


def compare(prev: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per RA arm present in both runs: both ratios, the relative change and both baselines' ms."""
    old = {_key(r): r for r in prev}
    rows = []
    for r in new:
        q = old.get(_key(r))
        if q is None or r["impl"].startswith("baseline") or not r.get("ratio_vs_baseline"):
            continue
        rows.append({"key": _key(r), "prev": q["ratio_vs_baseline"], "new": r["ratio_vs_baseline"],
                     "change": r["ratio_vs_baseline"] / q["ratio_vs_baseline"] - 1,
                     "base_ms_prev": q["ms_median"] / q["ratio_vs_baseline"],
                     "base_ms_new": r["ms_median"] / r["ratio_vs_baseline"]})
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any], prev_label: str, new_label: str) -> str:
    lines = [f"# Block bench: {prev_label} against {new_label}, one job on one card", "",
             f"{meta.get('device')}, torch {meta.get('torch')}, triton {meta.get('triton')}, {meta.get('precision')}. "
             "Each run's ratio is to its own baseline block timed in the same process; the change is new / prev - 1.",
             "", f"| arm | RA heads | SDPA | B x T | C | mode | pass | {prev_label} | {new_label} | change | "
             f"baseline ms ({prev_label} / {new_label}) |", "|---" * 11 + "|"]
    for r in rows:
        impl, heads_pct, sdpa, B, T, C, mode, pass_ = r["key"]
        lines.append(f"| {impl} | {heads_pct}% | {sdpa} | {B} x {T} | {C} | {mode} | {pass_} | {r['prev']:.4f} | "
                     f"{r['new']:.4f} | {100 * r['change']:+.2f}% | {r['base_ms_prev']:.3f} / "
                     f"{r['base_ms_new']:.3f} |")
    worst = max((r["change"] for r in rows), default=0.0)
    lines += ["", f"Largest slowdown: {100 * worst:+.2f}% over {len(rows)} rows."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prev", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--prev-label", default="prev")
    ap.add_argument("--new-label", default="new")
    ap.add_argument("--tolerance", type=float, default=0.01)
    args = ap.parse_args(argv)
    for p in (args.prev, args.new):
        if not p.is_file():
            print(f"bench_ab: {p} not found; give two bench.json files from one job's bench_ab stage",
                  file=sys.stderr)
            return 2
    prev, new = json.loads(args.prev.read_text()), json.loads(args.new.read_text())
    rows = compare(prev, new)
    args.out.write_text(render(rows, new[0] if new else {}, args.prev_label, args.new_label))
    print(args.out.read_text())
    return 1 if any(r["change"] > args.tolerance for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
