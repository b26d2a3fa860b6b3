"""Reports of ``ra bench``: markdown tables, the ratio plot, and the committed GPU results shown beside a CPU run.

On a GPU the report has the protocol's tables (docs/RA-SPEC.md section 4). On a CPU it shows paired ratios only
(each RA arm timed in alternating rounds with its baseline, so host drift cancels as far as it can) and says that
CPU timings are not a result; :func:`committed_gpu_table` prints the GPU numbers committed under
``benchmarks/results/<card>/bench.json`` for comparison.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

PASSES = ("fwd", "fwd+bwd", "step")
CPU_NOTE = ("**CPU timings are not a result.** The speed protocol (docs/RA-SPEC.md section 4) is defined on CUDA. "
            "On a CPU the block is host-bound and the machine's load moves every timing, so these rows only show "
            "that the harness runs. Each ratio is paired: the RA arm and its baseline timed in alternating rounds; "
            "the cell is the median per-round ratio and, in brackets, its range over the rounds.")
Record = dict[str, Any]


def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def is_cpu(records: list[Record]) -> bool:
    """True when the records were measured on a CPU (their ``device`` field)."""
    return bool(records) and str(records[0].get("device", "")).lower().startswith("cpu")


def _ratio_cell(r: Record | None) -> str:
    """``1.17x (0.95-1.40)`` from a paired record; ``failed`` / ``-`` otherwise."""
    if r is None:
        return "-"
    if r.get("error"):
        return "failed"
    ratio = r.get("ratio_paired")
    if ratio is None:
        return "-"
    lo, hi = r.get("ratio_paired_min"), r.get("ratio_paired_max")
    return f"{ratio:.2f}x" + (f" ({lo:.2f}-{hi:.2f})" if lo is not None and hi is not None else "")


def _failed(records: list[Record]) -> list[str]:
    errs = [r for r in records if r.get("error")]
    if not errs:
        return []
    return ["", "## Arms that failed (recorded, not dropped)", ""] + [
        f"- {r['impl']} ({r['sdpa']}) {r['B']}x{r['T']} C={r['C']} {r['pass']} {r['mode']}: {r['error']}"
        for r in errs]


def cpu_report(records: list[Record]) -> str:
    """The CPU report: the notice, then one table of paired ratios (no unpaired millisecond medians)."""
    v = records[0]
    lines = ["# ra bench on a CPU: paired ratios of RA against the baseline block", "",
             f"Device: {v['device']}; torch {v['torch']}; precision {v['precision']}; GPT-2 biases: {v['bias']}; "
             f"mode {', '.join(sorted({r['mode'] for r in records}))}.", "", CPU_NOTE, "",
             "| arm | backend | B x T | C | " + " | ".join(PASSES) + " | note |",
             "|---|---|---|---|" + "---|" * len(PASSES) + "---|"]
    by = {(r["impl"], r["sdpa"], r["heads_pct"], r["B"], r["T"], r["C"], r["pass"]): r for r in records}
    rows = sorted({(r["impl"], r["sdpa"], r["heads_pct"], r["B"], r["T"], r["C"]) for r in records
                   if not r["impl"].startswith("baseline")}, key=lambda k: (k[0], k[1], -k[2], k[5], k[4], k[3]))
    for impl, sdpa, pct, B, T, C in rows:
        label = impl if pct == 100 else f"{impl} ({pct}% RA heads)"
        note = next((r.get("note", "") for r in records if (r["impl"], r["sdpa"]) == (impl, sdpa)), "")
        cells = [_ratio_cell(by.get((impl, sdpa, pct, B, T, C, p))) for p in PASSES]
        lines.append(f"| {label} | {sdpa} | {B} x {T} | {C} | " + " | ".join(cells) + f" | {note} |")
    if not rows:
        lines.append("| (no RA arm ran) | | | | | | | |")
    return "\n".join(lines + _failed(records)) + "\n"


def _full_results(records: list[Record], by: dict, shape: tuple[int, int, int]) -> list[str]:
    """The seed's "Full Results" table at one shape; columns only for the (pass, mode) pairs that ran."""
    fB, fT, fC = shape
    cols = [(p, m) for p, m in (("fwd", "eager"), ("fwd+bwd", "eager"), ("step", "eager"), ("fwd", "graph"),
                                ("fwd+bwd", "graph"), ("step", "graph"), ("fwd", "compile"), ("fwd+bwd", "compile"))
            if any((r["pass"], r["mode"]) == (p, m) for r in records)]
    lines = [f"## Full Results (block B={fB}, T={fT}, C={fC})", "",
             "| configuration | backend | " + " | ".join(f"{m} {p}" for p, m in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    rows = sorted({(r["impl"], r["sdpa"], r["heads_pct"]) for r in records if (r["B"], r["T"], r["C"]) == shape
                   and r.get("scope") != "core"}, key=lambda k: (not k[0].startswith("baseline"), k[0], -k[2], k[1]))
    for impl, sdpa, pct in rows:
        cells = []
        for p, m in cols:
            r = by.get((impl, sdpa, pct, fB, fT, fC, p, m))
            if r is None:
                cells.append("n/a")
            elif r.get("ms_median") is None:
                cells.append("failed" if r.get("error") else "n/a")
            elif impl.startswith("baseline") or r.get("ratio_vs_baseline") is None:
                cells.append(f"{r['ms_median']:.3f}")
            else:
                cells.append(f"{r['ms_median']:.3f} ({r['ratio_vs_baseline']:.2f}x)")
        label = impl if impl.startswith("baseline") else f"{impl} ({pct}% RA heads)"
        lines.append(f"| {label} | {sdpa} | " + " | ".join(cells) + " |")
    return lines


def _evolution(by: dict, shape: tuple[int, int, int]) -> list[str]:
    fB, fT, fC = shape
    rows = []
    for impl in ("open_coded", "full_sdpa", "low_rank_fold", "same_flop_act_fold", "seed_as_ran", "ra_fast"):
        sdpa = "flash" if impl != "open_coded" else "any"
        r = by.get((impl, sdpa, 100, fB, fT, fC, "fwd+bwd", "graph"))
        if r is None or r.get("ms_median") is None:
            r = by.get((impl, sdpa, 100, fB, fT, fC, "fwd", "eager"))
        if r is not None:
            rows.append(f"| {impl} ({r['pass']} {r['mode']}) | {_fmt(r.get('ms_median'))} | "
                        f"{_fmt(r.get('ratio_vs_baseline'), 2)}x | {r.get('note', '')} |")
    if not rows:
        return []
    graphed = any(k[3:] == (fB, fT, fC, "fwd+bwd", "graph") for k in by)
    what = "graph fwd+bwd; eager fwd where a row cannot be graphed" if graphed else "eager fwd"
    return ["", f"## Performance Evolution ({what}, B={fB}, T={fT})",
            "", "| implementation | ms | vs baseline (flash) | note |", "|---|---|---|---|"] + rows


def _ratio_vs_shape(records: list[Record], by: dict) -> list[str]:
    keys = sorted({(r["impl"], r["sdpa"], r["B"], r["T"], r["C"]) for r in records if r["mode"] == "graph"
                   and r["heads_pct"] == 100 and r.get("scope") != "core" and not r["impl"].startswith("baseline")},
                  key=lambda k: (k[0], k[1], k[4], k[3]))
    if not keys:
        return []
    lines = ["", "## Ratio vs T and width (graph mode)", "",
             "| impl | backend | B x T | C | fwd | fwd+bwd | step | peak mem (fwd+bwd) vs baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for impl, sdpa, B, T, C in keys:
        rs = [by.get((impl, sdpa, 100, B, T, C, p, "graph")) for p in PASSES]
        ratios = [_fmt(x.get("ratio_vs_baseline"), 3) if x else "-" for x in rs]
        mem = _fmt(rs[1].get("mem_ratio_vs_baseline"), 3) if rs[1] else "-"
        lines.append(f"| {impl} | {sdpa} | {B} x {T} | {C} | " + " | ".join(ratios) + f" | {mem} |")
    return lines


def _core(records: list[Record]) -> list[str]:
    core = [r for r in records if r.get("scope") == "core"]
    if not core:
        return []
    lines = ["", "## Attention core TFLOP/s (causal, D=64, H=12, bf16, graph; FLOPs 4BHT^2D/2 fwd, x3.5 fwd+bwd)",
             "", "| impl | B x T | pass | ms | TFLOP/s | time vs cuDNN |", "|---|---|---|---|---|---|"]
    return lines + [f"| {r['impl']} | {r['B']} x {r['T']} | {r['pass']} | {_fmt(r.get('ms_median'))} | "
                    f"{_fmt(r.get('tflops'), 1)} | {_fmt(r.get('ratio_vs_baseline'), 2)}x |" for r in core]


def markdown_report(records: list[Record]) -> str:
    """The report: :func:`cpu_report` for CPU records; on a GPU the seed's "Full Results" and "Performance
    Evolution" tables, ratios against T and width, and the attention core's TFLOP/s (each only when it has rows)."""
    if not records:
        return "# ra bench\n\nno records\n"
    if is_cpu(records):
        return cpu_report(records)
    v = records[0]
    modes = {r["mode"] for r in records}
    paired = sorted({r["mode"] for r in records if r.get("ratio_paired") is not None})
    lines = ["# ra bench: RA vs the baseline attention block",
             "", f"Device: **{v['device']}**; torch {v['torch']}, triton {v['triton']}, CUDA {v.get('cuda')}; "
             f"precision {v['precision']}; GPT-2 biases: {v['bias']}. Median ms per call, ratio against "
             "the baseline on the same SDPA backend, pass, mode and shape"
             + (f"; {' and '.join(paired)} ratios are paired (timed in alternating rounds with the baseline)"
                if paired else "") + "." + (" Graph = CUDA-graph replay (pure GPU time)." if "graph" in modes else ""),
             ""]
    by: dict[tuple, Record] = {}
    for r in records:
        by.setdefault((r["impl"], r["sdpa"], r["heads_pct"], r["B"], r["T"], r["C"], r["pass"], r["mode"]), r)
    block = [r for r in records if r.get("scope") != "core"]
    if block:
        shape = Counter((r["B"], r["T"], r["C"]) for r in block).most_common(1)[0][0]
        lines += _full_results(records, by, shape) + _evolution(by, shape)
    lines += _ratio_vs_shape(records, by) + _core(records) + _failed(records)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# The committed GPU results
# --------------------------------------------------------------------------------------------------------------

def find_committed_results(roots: list[Path] | None = None) -> Path | None:
    """The first ``benchmarks/results/<card>/bench.json`` under the working directory or the source checkout
    (``<card>`` folders in name order); None when there is none (e.g. an installed package without the repo)."""
    if roots is None:
        roots = [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in roots:
        found = sorted((root / "benchmarks" / "results").glob("*/bench.json"))
        if found:
            return found[0]
    return None


def committed_gpu_table(impls: set[str], path: Path | None = None) -> str:
    """The committed GPU ratios of ``impls`` (graph mode where the arm has graph rows, else eager; width 768) as
    markdown, or a line saying why there is none. Never raises for a missing or unreadable file."""
    path = path if path is not None else find_committed_results()
    if path is None:
        return ("No committed GPU results found (looked for benchmarks/results/<card>/bench.json under the working "
                "directory and the source checkout); see the README's Results section.\n")
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return f"Committed GPU results at {path} could not be read ({type(exc).__name__}: {exc}).\n"
    rows = [r for r in records if r.get("impl") in impls and not str(r.get("impl")).startswith("baseline")
            and r.get("heads_pct") == 100 and r.get("C") == 768 and r.get("scope") != "core"
            and r.get("ratio_vs_baseline") is not None]
    graphed = {(r["impl"], r["sdpa"]) for r in rows if r["mode"] == "graph"}
    rows = [r for r in rows if r["mode"] == ("graph" if (r["impl"], r["sdpa"]) in graphed else "eager")]
    if not rows:
        return f"The committed GPU results at {path} have no rows for {', '.join(sorted(impls))}.\n"
    try:
        rel = str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:  # outside the working directory: the full path
        rel = str(Path(path).resolve())
    v = rows[0]
    lines = [f"## For comparison: the committed GPU results ({v.get('device')}, torch {v.get('torch')}; `{rel}`)", "",
             "Time / baseline on the same SDPA backend, width 768; graph = CUDA-graph replay (eager where the arm "
             "cannot be captured).", "",
             "| arm | backend | B x T | mode | " + " | ".join(PASSES) + " |",
             "|---|---|---|---|" + "---|" * len(PASSES)]
    by = {(r["impl"], r["sdpa"], r["B"], r["T"], r["mode"], r["pass"]): r for r in rows}
    for impl, sdpa, B, T, mode in sorted({(r["impl"], r["sdpa"], r["B"], r["T"], r["mode"]) for r in rows},
                                         key=lambda k: (k[0], k[1], k[3])):
        cells = [by.get((impl, sdpa, B, T, mode, p)) for p in PASSES]
        lines.append(f"| {impl} | {sdpa} | {B} x {T} | {mode} | "
                     + " | ".join(f"{c['ratio_vs_baseline']:.3f}x" if c else "-" for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Plot and files
# --------------------------------------------------------------------------------------------------------------

CLIP = 3.0  # the ratio axis ends here so differences of a few percent near 1.0x stay visible; longer bars are
# hatched, drawn to the edge and labelled with their value


def _bar_colour(v: float) -> str:
    return "tab:green" if v <= 1.03 else "tab:orange" if v <= 1.6 else "tab:red"


def plot(records: list[Record], path: Path) -> None:
    """Write :func:`ratio_figure` of ``records`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = ratio_figure(records)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_figure(records: list[Record]) -> Any:
    """Horizontal bars of time / baseline per pass (graph mode on CUDA, eager on a CPU; width 768 when there),
    drawn from the 1.0x line on a linear axis up to ``CLIP``, each bar labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    ratio = "ratio_paired" if is_cpu(records) else "ratio_vs_baseline"
    rows = [r for r in records if r.get(ratio) and r["heads_pct"] == 100 and r.get("scope") != "core"
            and not r["impl"].startswith("baseline")]
    mode = "graph" if any(r["mode"] == "graph" for r in rows) else "eager"
    rows = [r for r in rows if r["mode"] == mode]
    if any(r["C"] == 768 for r in rows):
        rows = [r for r in rows if r["C"] == 768]
    labels = sorted({(r["impl"], r["sdpa"], r["B"], r["T"], r["C"]) for r in rows}, key=lambda k: (k[0], k[1], k[3]))
    fig, axes = plt.subplots(1, len(PASSES), figsize=(5.5 * len(PASSES), 0.38 * max(1, len(labels)) + 1.8),
                             squeeze=False, sharey=True)
    widths = sorted({r["C"] for r in rows})
    hi = min(max([r[ratio] for r in rows] + [1.1]), CLIP)
    lo = min([r[ratio] for r in rows] + [0.9])
    for ax, pass_ in zip(axes[0], PASSES):
        vals = []
        for impl, sdpa, B, T, C in labels:
            r = next((r for r in rows if (r["impl"], r["sdpa"], r["B"], r["T"], r["C"], r["pass"]) ==
                      (impl, sdpa, B, T, C, pass_)), None)
            vals.append(r[ratio] if r is not None else None)
        ys = [i for i, v in enumerate(vals) if v is not None]
        vs = [v for v in vals if v is not None]
        bars = ax.barh(ys, [min(v, CLIP) - 1.0 for v in vs], left=1.0, color=[_bar_colour(v) for v in vs],
                       height=0.7, hatch=[("//" if v > CLIP else "") for v in vs], edgecolor="white", lw=0)
        ax.bar_label(bars, labels=[f"{v:.2f}x" + (" \u2192" if v > CLIP else "") for v in vs], padding=3,
                     fontsize=8)
        ax.axvline(1.0, color="k", lw=1.0)
        span = hi - lo
        ax.set_xlim(lo - (0.25 if lo < 1.0 else 0.05) * span, hi + 0.3 * span)  # room for the value labels
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.2f}x" if span < 1 else f"{x:g}x"))
        ax.grid(axis="x", color="0.85", lw=0.6)
        ax.set_axisbelow(True)
        ax.set_yticks(range(len(labels)), [f"{i}/{s} {B}x{T}" + (f" C={C}" if len(widths) > 1 else "")
                                           for i, s, B, T, C in labels], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{pass_} ({mode}): time / baseline", fontsize=10)
        if not vs:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="0.4")
    v = records[0] if records else {}
    where = "CPU: not a result, harness check only" if is_cpu(records) else str(v.get("device", ""))
    width = f"C={widths[0]}; " if len(widths) == 1 else ""
    clipped = f"; hatched bars run past {CLIP:g}x" if any(r[ratio] > CLIP for r in rows) else ""
    fig.suptitle(f"RA block vs baseline ({where}; {width}torch {v.get('torch', '')}); left of 1.0x = faster"
                 + clipped, fontsize=11)
    fig.tight_layout()
    return fig


def write_results(records: list[Record], out_dir: Path) -> None:
    """``bench.json``, ``bench.md`` and ``bench.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "bench.json.tmp"
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, out_dir / "bench.json")
    (out_dir / "bench.md").write_text(markdown_report(records))
    plot(records, out_dir / "bench.png")
