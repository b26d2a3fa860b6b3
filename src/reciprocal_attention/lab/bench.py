"""``ra bench``: RA against the baseline attention block, by the protocol of docs/RA-SPEC.md section 4.

Every arm is the same module boundary, ``c_attn -> attention -> c_proj``, timed with CUDA events after warm-up,
``repeats`` (>= 7) timings of ``inner`` calls each, reporting median/min/max per call. Baseline and RA run in the
same process on the same card; each RA arm's ratio is against the baseline on the same SDPA backend, pass, mode,
shape and precision. Modes: ``eager`` (plain calls; host-bound at these sizes, so each RA arm is timed in
alternating rounds with its baseline and the ratio is the median of the per-round ratios), ``graph`` (one CUDA graph
captured, then replayed: pure GPU time) and ``compile`` (``torch.compile``). Passes: ``fwd`` (under
``no_grad``), ``fwd+bwd`` (parameter and input gradients), ``step`` (``fwd+bwd`` plus a fused AdamW step, so a
folded weight is rebuilt every step).

On a CPU the same code runs at small shapes, eager fp32, with the arms that need no CUDA, and says so: CPU numbers
are not the protocol's numbers, and the report (``bench_report``) shows only paired ratios. The command line is
``bench_cli`` (every option honoured or refused with a ``UserError`` that names the valid choices), the timing
``timing``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .bench_arms import MODES, Arm, default_arms
from .bench_report import PASSES
from .timing import Timer, machine_versions, make_step, sdpa_context, warm_workspaces

log = logging.getLogger(__name__)



@dataclass
class BenchConfig:
    """What to run. Defaults are the RA-SPEC section-4 protocol on a GPU."""

    shapes: list[tuple[int, int]] = field(default_factory=lambda: [(8, 1024), (2, 4096), (1, 8192)])
    widths: list[tuple[int, int]] = field(default_factory=lambda: [(768, 12)])
    scaling_widths: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 16), (1280, 20)])
    passes: tuple[str, ...] = PASSES
    modes: tuple[str, ...] = MODES
    groups: set[str] = field(default_factory=lambda: {"core", "heads", "evolution", "kernels"})
    precision: str = "bf16"  # bf16 parameters (the seed's table); "amp" = fp32 parameters under bf16 autocast
    bias: bool = True
    warmup: int = 5
    repeats: int = 7
    inner: int = 20
    device: str = "cuda"
    full_matrix_shape: tuple[int, int] = (8, 1024)  # every arm/pass/mode here; elsewhere a subset
    arms: set[str] | None = None  # only these impls (the baselines always run: the ratios need them)
    core_tflops: bool = True


def _plan(cfg: BenchConfig, arms: list[Arm]) -> list[tuple[Arm, int, int, int, int, str, str]]:
    """Expand arms x shapes x widths x passes x modes, keeping the full matrix at one shape (time budget)."""
    jobs = []
    for (C, H) in cfg.widths + cfg.scaling_widths:
        shapes = cfg.shapes if (C, H) in cfg.widths else [cfg.full_matrix_shape]
        for (B, T) in shapes:
            full = (B, T) == cfg.full_matrix_shape and (C, H) in cfg.widths
            for arm in arms:
                if not full and not ({"baseline_flash", "baseline_cudnn", "ra_fast"} & {arm.impl} or
                                     arm.impl in ("triton_bias", "full_triton", "flex_bias", "channel_fold_bias",
                                                  "channel_bias", "seed_as_ran")):
                    continue
                if not full and arm.impl in ("flex_bias", "seed_as_ran", "channel_fold_bias") and T > 4096:
                    continue
                if (C, H) not in cfg.widths and arm.impl not in ("baseline_flash", "baseline_cudnn", "ra_fast"):
                    continue
                if arm.heads_pct != 100 and not full:
                    continue
                for pass_ in cfg.passes:
                    if pass_ not in arm.passes:
                        continue
                    for mode in cfg.modes:
                        if mode not in arm.modes:
                            continue
                        if not full and mode != "graph" and not (mode == "eager" and arm.impl in
                                                                 ("baseline_flash", "baseline_cudnn", "ra_fast")):
                            continue
                        if mode == "compile" and not (full and arm.sdpa == "cudnn" and
                                                      arm.impl in ("baseline_cudnn", "ra_fast")):
                            continue  # compile is slow to build: the headline pair only
                        if mode == "compile" and pass_ == "step":
                            continue
                        jobs.append((arm, B, T, C, H, pass_, mode))
    return jobs


def needs_cuda(arm: Arm) -> bool:
    """An arm that runs only on CUDA: a cuDNN/efficient SDPA backend, the fused Triton kernels or FlexAttention."""
    return arm.sdpa not in ("flash", "any") or arm.impl.startswith(("triton", "full_triton", "flex"))


def run_bench(cfg: BenchConfig, progress: bool = True, partial: Path | None = None) -> list[dict[str, Any]]:
    """Run the plan and return one record per (arm, shape, pass, mode); ratios filled against the baselines.

    ``partial``: rewrite this JSON file after every record, so a run cut by a time limit keeps what it measured
    (``ra bench --render DIR`` renders it once renamed to ``bench.json``)."""
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    if not cuda:
        print(f"ra bench: no CUDA device: CPU shapes, {'/'.join(cfg.modes)} mode, {cfg.precision}. CPU timings are "
              "not a result (the protocol of docs/RA-SPEC.md section 4 is defined on CUDA); they show the harness "
              "runs.", flush=True)
    arms = default_arms(cfg.groups)
    if cfg.arms is not None:
        arms = [a for a in arms if a.impl in cfg.arms or a.impl.startswith("baseline")]
    if not cuda:
        skipped = [a for a in arms if needs_cuda(a)]
        if skipped:
            print("ra bench: skipped on a CPU (they need CUDA): "
                  + ", ".join(sorted({f"{a.impl} ({a.sdpa})" for a in skipped})), flush=True)
        arms = [a for a in arms if not needs_cuda(a)]
    jobs = _plan(cfg, arms)
    baselines = {a.impl: a for a in arms if a.impl.startswith("baseline")}
    paired_fns: dict[tuple, Callable[[], None]] = {}  # baselines, prepared once per (impl, shape, pass, mode)
    versions = machine_versions()
    timer = Timer(device, cfg.warmup, cfg.repeats, cfg.inner)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    records: list[dict[str, Any]] = []
    if cuda:
        warm_workspaces(device)
    try:
        from tqdm import tqdm

        it = tqdm(jobs, desc="ra bench", disable=not progress, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        it = jobs
    for arm, B, T, C, H, pass_, mode in it:
        if any(k[1:5] != (B, T, C, H) for k in paired_fns):  # jobs come grouped by shape: free the last shape's
            paired_fns.clear()
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(f"{arm.impl}/{arm.sdpa} {B}x{T} C={C} {pass_} {mode}")
        rec: dict[str, Any] = {"impl": arm.impl, "variant": arm.variant, "heads_pct": arm.heads_pct, "B": B, "T": T,
                               "C": C, "H": H, "pass": pass_, "mode": mode, "sdpa": arm.sdpa,
                               "baseline_impl": arm.baseline, "precision": cfg.precision, "bias": cfg.bias,
                               "note": arm.note, **versions}
        try:
            base = baselines.get(arm.baseline) if not arm.impl.startswith("baseline") else None
            rec.update(_run_one(arm, B, T, C, H, pass_, mode, cfg, device, dtype, timer, base, paired_fns))
        except Exception as exc:  # a failing arm is recorded, never silently dropped
            log.warning("arm %s (%s) %dx%d %s %s failed: %s", arm.impl, arm.sdpa, B, T, pass_, mode, exc)
            rec.update({"ms_median": None, "ms_min": None, "ms_max": None, "peak_mem_bytes": None,
                        "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})
        finally:
            torch._dynamo.reset() if mode == "compile" else None
            if cuda:
                torch.cuda.empty_cache()
        records.append(rec)
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial.with_suffix(".tmp")
            tmp.write_text(json.dumps(records))
            os.replace(tmp, partial)
    fill_ratios(records)
    if cfg.core_tflops and cuda and "kernels" in cfg.groups and (cfg.arms is None or "core_triton" in cfg.arms):
        records += run_core_tflops(cfg, device, timer, versions)
    return records


def _prepare(arm: Arm, B: int, T: int, C: int, H: int, pass_: str, mode: str, cfg: BenchConfig,
             device: torch.device, dtype: torch.dtype, amp) -> tuple[Callable[[], None], int | None]:
    """Build ``arm``'s block and the timed callable, and make the first call (compiles, allocates grads/optimizer
    state). On CUDA also returns the peak memory of a steady-state call over everything the arm holds (measured
    before any graph capture, whose pool would count)."""
    torch.manual_seed(0)
    module = arm.build(C, H, max(T, 1024), cfg.bias).to(device=device, dtype=dtype)
    module.train()
    x = torch.randn(B, T, C, device=device, dtype=dtype)
    target = torch.compile(module) if mode == "compile" else module
    with sdpa_context(arm.sdpa), amp:
        fn = make_step(target, x, pass_)
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            base_mem = torch.cuda.memory_allocated(device)
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) - base_mem
    return fn, peak


def _run_one(arm: Arm, B: int, T: int, C: int, H: int, pass_: str, mode: str, cfg: BenchConfig,
             device: torch.device, dtype: torch.dtype, timer: Timer, baseline: Arm | None = None,
             paired_fns: dict[tuple, Callable[[], None]] | None = None) -> dict[str, Any]:
    """Time one (arm, shape, pass, mode). Eager and graph with a ``baseline``: the two are timed in alternating
    rounds and ``ratio_paired`` is the median of the per-round ratios (eager calls are host-bound, and the host's
    speed can drift by tens of percent within minutes, so unpaired eager ratios swing by several x; graph replays
    drift by about 1%, the size of the effects at T=1024). The baseline's prepared callable (its
    captured graph in graph mode) is kept in ``paired_fns`` for the next arm of the same shape, pass and mode."""
    # cache_enabled=False: autocast's weight-cast cache is not CUDA-graph safe (a capture fails without it)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if cfg.precision == "amp"
           else contextlib.nullcontext())
    if mode == "graph" and arm.syncs_host:
        raise RuntimeError("this arm synchronises the host (.item()/nonzero): it cannot be captured")

    def prepared(a: Arm) -> tuple[Callable[[], None], int | None]:  # graph mode: captured under a's SDPA backend
        f, peak = _prepare(a, B, T, C, H, pass_, mode, cfg, device, dtype, amp)
        if mode == "graph":
            with sdpa_context(a.sdpa), amp:
                f = timer.graphed(f)
        return f, peak

    fn, peak = prepared(arm)
    out: dict[str, Any] = {"peak_mem_bytes": peak, "calls_per_timing": timer.inner}
    if mode in ("eager", "graph") and baseline is not None:
        paired_fns = {} if paired_fns is None else paired_fns
        key = (baseline.impl, B, T, C, H, pass_, mode)
        if key not in paired_fns:
            paired_fns[key] = prepared(baseline)[0]
        with amp:
            times, base_times = timer.measure_paired((fn, lambda: sdpa_context(arm.sdpa)),
                                                     (paired_fns[key], lambda: sdpa_context(baseline.sdpa)))
        per_round = [t / b for t, b in zip(times, base_times)]
        out.update({"ratio_paired": statistics.median(per_round), "ratio_paired_min": min(per_round),
                    "ratio_paired_max": max(per_round), "paired_baseline_ms_median": statistics.median(base_times)})
    else:
        with sdpa_context(arm.sdpa), amp:
            times = timer.measure(fn)
    out.update({"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
                "n_timings": len(times)})
    return out


def fill_ratios(records: list[dict[str, Any]]) -> None:
    """``ratio_vs_baseline`` = median / the designated baseline's median at the same shape/pass/mode/precision."""
    key = lambda r: (r["B"], r["T"], r["C"], r["pass"], r["mode"], r["precision"], r["bias"])  # noqa: E731
    names = {r["baseline_impl"] for r in records}
    base = {(r["impl"],) + key(r): r for r in records if r["impl"] in names}
    for r in records:
        b = base.get((r["baseline_impl"],) + key(r))
        ok = b is not None and b.get("ms_median") and r.get("ms_median")
        r["ratio_vs_baseline"] = r["ms_median"] / b["ms_median"] if ok else None
        if r.get("ratio_paired") is not None:  # timed in alternating rounds with its baseline
            r["ratio_unpaired"] = r["ratio_vs_baseline"]
            r["ratio_vs_baseline"] = r["ratio_paired"]
        if ok and b.get("peak_mem_bytes") and r.get("peak_mem_bytes") is not None:
            r["mem_ratio_vs_baseline"] = r["peak_mem_bytes"] / b["peak_mem_bytes"]


def run_core_tflops(cfg: BenchConfig, device: torch.device, timer: Timer, versions: dict[str, str],
                    D: int = 64, H: int = 12) -> list[dict[str, Any]]:
    """Attention core only (no projections): TFLOP/s by the FlashAttention convention, causal, bf16."""
    from ..ops.flash import flash_ra_attention

    out = []
    for (B, T) in cfg.shapes:
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        flops_fwd = 4 * B * H * T * T * D / 2
        impls = {
            "core_sdpa_cudnn": ("cudnn", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            "core_sdpa_flash": ("flash", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            "core_triton": ("any", lambda: flash_ra_attention(q, k, v)),
        }
        for name, (sdpa, f) in impls.items():
            for pass_ in ("fwd", "fwd+bwd"):
                rec = {"impl": name, "variant": "standard", "heads_pct": 0, "B": B, "T": T, "C": H * D, "H": H,
                       "pass": pass_, "mode": "graph", "sdpa": sdpa, "scope": "core", "precision": "bf16",
                       "bias": False, "baseline_impl": "core_sdpa_cudnn", **versions}
                try:
                    with sdpa_context(sdpa):
                        if pass_ == "fwd":
                            def fn(f=f):
                                with torch.no_grad():
                                    f()
                        else:
                            def fn(f=f):
                                torch.autograd.grad(f(), (q, k, v), do)
                        fn()
                        times = timer.measure(timer.graphed(fn))
                    med = statistics.median(times)
                    flops = flops_fwd * (1.0 if pass_ == "fwd" else 3.5)
                    rec.update({"ms_median": med, "ms_min": min(times), "ms_max": max(times),
                                "tflops": flops / (med * 1e-3) / 1e12, "peak_mem_bytes": None})
                except Exception as exc:
                    rec.update({"ms_median": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                out.append(rec)
    fill_ratios(out)
    return out


# --------------------------------------------------------------------------------------------------------------
