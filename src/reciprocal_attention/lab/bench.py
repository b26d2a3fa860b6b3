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
are not the protocol's numbers, and the report (``bench_report``) shows only paired ratios. Options it cannot honour
are refused with a ``UserError`` that names the valid choices.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .bench_arms import MODES, Arm, default_arms
from .bench_report import PASSES, committed_gpu_table, markdown_report, plot, write_results  # noqa: F401
from .errors import UserError

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------

def sdpa_context(name: str):
    """Context manager restricting SDPA to one backend (``any`` leaves PyTorch's choice)."""
    if name == "any":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def _make_step(module: nn.Module, x: Tensor, pass_: str) -> Callable[[], None]:
    """The callable timed for one pass."""
    if pass_ == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                module(x)
        return fwd
    gy = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=None)
    xg = x.detach().clone().requires_grad_(True)
    if pass_ == "fwd+bwd":
        def fwd_bwd() -> None:
            module(xg).backward(gy)
        return fwd_bwd
    params = [p for p in module.parameters() if p.requires_grad]
    cuda = x.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda, capturable=cuda)

    def step() -> None:
        module(xg).backward(gy)
        opt.step()
    return step


class Timer:
    """CUDA-event (or perf_counter on CPU) timing of ``fn`` in a mode, per call in milliseconds."""

    def __init__(self, device: torch.device, warmup: int, repeats: int, inner: int) -> None:
        self.device, self.warmup, self.repeats, self.inner = device, warmup, repeats, inner

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], None]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        self._sync()
        return [self._block(fn) for _ in range(self.repeats)]

    def _block(self, fn: Callable[[], None]) -> float:
        """ms per call of ``inner`` back-to-back calls."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / self.inner
        import time

        t0 = time.perf_counter()
        for _ in range(self.inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / self.inner

    def measure_paired(self, a: tuple[Callable[[], None], Callable[[], Any]],
                       b: tuple[Callable[[], None], Callable[[], Any]]) -> tuple[list[float], list[float]]:
        """Time two ``(fn, context factory)`` pairs in alternating rounds (the order flips every round); per-round
        ms per call of each. A fresh context (e.g. an SDPA backend choice) is entered around each block."""
        for fn, ctx in (a, b):
            with ctx():
                for _ in range(self.warmup):
                    fn()
        self._sync()
        ta, tb = [], []
        for i in range(self.repeats):
            for fn, ctx, out in ((a[0], a[1], ta), (b[0], b[1], tb))[:: 1 if i % 2 == 0 else -1]:
                with ctx():
                    out.append(self._block(fn))
        return ta, tb

    def graphed(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Capture ``fn`` in one CUDA graph (after side-stream warm-up) and return its replay."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()

        def replay(fn: Callable[[], None] = fn) -> None:  # holds fn (its module and inputs: the graph's memory)
            g.replay()
        return replay


def _versions() -> dict[str, str]:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    return {"device": dev, "torch": torch.__version__, "triton": triton_v,
            "cuda": torch.version.cuda or "none", "python": platform.python_version()}


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------

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
    versions = _versions()
    timer = Timer(device, cfg.warmup, cfg.repeats, cfg.inner)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    records: list[dict[str, Any]] = []
    if cuda:
        _warm_workspaces(device)
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


def _warm_workspaces(device: torch.device) -> None:
    """cuBLAS and the SDPA backends allocate their workspaces on first use and keep them: do that before any arm's
    memory baseline, or the first arm's peak carries them."""
    x = torch.randn(256, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.linear(x, x).sum().backward()
    q = torch.randn(1, 2, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    for backend in ("flash", "cudnn", "efficient"):
        try:
            with sdpa_context(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        except RuntimeError:  # a backend this card/build lacks: its arms record the error themselves
            pass
    torch.cuda.synchronize(device)


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
        fn = _make_step(target, x, pass_)
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
# Command line
# --------------------------------------------------------------------------------------------------------------

GROUPS = ("core", "heads", "evolution", "kernels")
CPU_SHAPES = [(2, 64), (1, 128)]
CPU_WIDTH = (64, 4)
TIMING_OPTIONS = ("device", "groups", "shapes", "arms", "widths", "modes", "passes", "precision", "repeats",
                  "inner", "out")


def _choices(value: str, option: str, valid: tuple[str, ...]) -> list[str]:
    """A comma list whose every item is one of ``valid``; a ``UserError`` naming the option otherwise."""
    items = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in items if s not in valid]
    if bad or not items:
        raise UserError(f"{option}: unknown value(s) {', '.join(bad) or repr(value)}; valid: {', '.join(valid)}")
    return items


def _pairs(value: str, option: str, sep: str, form: str) -> list[tuple[int, int]]:
    """``"8x1024,2x4096"`` -> ``[(8, 1024), (2, 4096)]`` (positive ints), else a ``UserError`` naming ``form``."""
    out = []
    for item in (s.strip() for s in value.split(",") if s.strip()):
        parts = item.split(sep)
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"{option}: expected {form} (positive integers, comma-separated); got {item!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def _arm_groups() -> dict[str, str]:
    """Every arm name -> the first group that runs it (``core_triton``: the attention-core TFLOP/s table)."""
    where = {a.impl: "core" for a in default_arms({"core"})}
    for g in GROUPS[1:]:
        for a in default_arms({g}):
            where.setdefault(a.impl, g)
    where["core_triton"] = "kernels"
    return where


def _check_arms(names: list[str], groups: set[str], cuda: bool) -> None:
    """Named arms must exist, belong to a selected group and (on a CPU) run without CUDA."""
    where = _arm_groups()
    missing = [a for a in names if where[a] != "core" and where[a] not in groups]  # core arms always run
    if missing:
        raise UserError("--arms: " + ", ".join(f"{a} is in group {where[a]!r}" for a in missing)
                        + f", not in --groups {','.join(sorted(groups))}; add the group or drop the arm")
    if not cuda:
        cpu_ok = {a.impl for a in default_arms(set(GROUPS)) if not needs_cuda(a)}
        gpu_only = [a for a in names if a not in cpu_ok]
        if gpu_only:
            raise UserError(f"--arms: {', '.join(gpu_only)} need(s) CUDA (cuDNN, fused Triton kernels or "
                            f"FlexAttention); arms that run on a CPU: {', '.join(sorted(cpu_ok))}")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` an ``ra bench`` command line asks for. Every option is honoured or refused with a
    ``UserError``: nothing the user set is dropped (a CPU runs eager fp32 at small shapes by default and refuses
    ``--modes graph/compile`` and ``--precision bf16``)."""
    cuda_here = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda_here else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device: expected cpu, cuda or cuda:N; got {device!r}")
    cuda = device.startswith("cuda")
    if cuda and not cuda_here:
        raise UserError(f"--device {device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    groups = set(_choices(args.groups, "--groups", GROUPS)) if args.groups else set(GROUPS)
    arms = None
    if args.arms:
        arms = set(_choices(args.arms, "--arms", tuple(_arm_groups())))
        _check_arms(sorted(arms), groups, cuda)
    modes = tuple(_choices(args.modes, "--modes", MODES)) if args.modes else (MODES if cuda else ("eager",))
    if not cuda and set(modes) - {"eager"}:
        raise UserError(f"--modes {args.modes}: graph (CUDA graphs) and compile are timed on CUDA only; a CPU "
                        "runs --modes eager")
    precision = args.precision or ("bf16" if cuda else "fp32")
    if not cuda and precision == "bf16":
        raise UserError("--precision bf16: a CPU runs fp32 (or amp: fp32 parameters under bf16 autocast)")
    if cuda and precision == "fp32":
        raise UserError("--precision fp32: the flash and cuDNN SDPA backends need bf16; use bf16 or amp on CUDA")
    for name in ("repeats", "inner"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name}: expected an integer >= 1; got {getattr(args, name)}")
    cfg = BenchConfig(device=device, groups=groups, precision=precision, bias=not args.no_bias, arms=arms,
                      modes=modes, passes=tuple(_choices(args.passes, "--passes", PASSES)) if args.passes else PASSES,
                      repeats=args.repeats or 7, inner=args.inner or (20 if cuda else 3), warmup=5 if cuda else 1)
    if args.shapes is not None:
        cfg.shapes = _pairs(args.shapes, "--shapes", "x", "BxT, e.g. 8x1024,2x4096")
        if not cfg.shapes:
            raise UserError("--shapes: expected at least one BxT, e.g. 8x1024")
    elif not cuda:
        cfg.shapes = list(CPU_SHAPES)
    cfg.full_matrix_shape = cfg.shapes[0]
    if not cuda:
        cfg.widths = [CPU_WIDTH]
    if args.widths is not None:
        cfg.scaling_widths = _pairs(args.widths, "--widths", "/", "C/H, e.g. 1024/16,1280/20 ('' for none)")
        bad = [f"{c}/{h}" for c, h in cfg.scaling_widths if c % h]
        if bad:
            raise UserError(f"--widths: the width C must be a multiple of the heads H; got {', '.join(bad)}")
    elif not cuda:
        cfg.scaling_widths = []
    return cfg


def build_parser() -> argparse.ArgumentParser:
    """The ``ra bench`` argument parser (every option with its help)."""
    ap = argparse.ArgumentParser(
        prog="ra bench", description="Benchmark RA against the baseline attention block (docs/RA-SPEC.md section 4).",
        epilog="Without CUDA: small shapes, eager mode, fp32, and only the arms that run on a CPU; the report then "
               "shows paired ratios and says CPU timings are not a result.")
    from .bench_model import add_arguments as add_model_arguments

    add_model_arguments(ap)
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for bench.json, bench.md and bench.png (default benchmarks/results/local)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available, else cpu)")
    ap.add_argument("--groups", default=None, help=f"comma list of arm groups: {', '.join(GROUPS)} (default all)")
    ap.add_argument("--shapes", default=None,
                    help="block input shapes BxT, e.g. 8x1024,2x4096,1x8192 (the default on CUDA; "
                         f"{','.join(f'{b}x{t}' for b, t in CPU_SHAPES)} on a CPU); the first gets the full matrix")
    ap.add_argument("--arms", default=None,
                    help="only these arms, e.g. ra_fast,channel_bias (the baselines always run: ratios need them); "
                         "unknown names are an error that lists the valid ones")
    ap.add_argument("--widths", default=None,
                    help="extra widths C/H timed at the first shape, e.g. 1024/16,1280/20; '' for none (default "
                         "1024/16,1280/20 on CUDA, none on a CPU)")
    ap.add_argument("--modes", default=None,
                    help=f"comma list of: {', '.join(MODES)} (default all on CUDA; a CPU runs eager only)")
    ap.add_argument("--passes", default=None, help=f"comma list of: {', '.join(PASSES)} (default all)")
    ap.add_argument("--precision", choices=("bf16", "amp", "fp32"), default=None,
                    help="bf16 parameters (CUDA default), amp (fp32 parameters under bf16 autocast) or fp32 "
                         "(the CPU default)")
    ap.add_argument("--no-bias", action="store_true", help="bias-free c_attn/c_proj (the seed's table)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timings per row; each is the mean of --inner calls (default 7)")
    ap.add_argument("--inner", type=int, default=None, help="calls per timing (default 20 on CUDA, 3 on a CPU)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    ap.add_argument("--render", type=Path, default=None, metavar="DIR",
                    help="re-render DIR/bench.md and bench.png from DIR/bench.json (no timing; no other option "
                         "applies)")
    return ap


def _render(args: argparse.Namespace) -> int:
    """``--render DIR``: rewrite the reports from an existing ``bench.json``."""
    set_ = [f"--{k.replace('_', '-')}" for k in TIMING_OPTIONS + ("no_bias",) if getattr(args, k) not in (None, False)]
    if set_:
        raise UserError(f"--render re-renders existing results without timing: {', '.join(set_)} do(es) not apply")
    src = args.render / "bench.json"
    if not src.is_file():
        raise UserError(f"--render {args.render}: no bench.json there (a cut run leaves bench.partial.json: rename "
                        "it to bench.json to render what it measured)")
    try:
        records = json.loads(src.read_text())
    except ValueError as exc:
        raise UserError(f"--render: {src} is not valid JSON ({exc})") from exc
    fill_ratios(records)
    write_results(records, args.render)
    print(f"re-rendered {args.render}/bench.md and bench.png from {len(records)} records")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ra bench``: time the plan, write ``bench.json/md/png`` and print the report."""
    args = build_parser().parse_args(argv)
    if args.render is not None:
        return _render(args)
    if args.model is not None:
        from .bench_model import run_from_args

        return run_from_args(args)
    cfg = config_from_args(args)
    out = args.out if args.out is not None else Path("benchmarks/results/local")
    partial = out / "bench.partial.json"
    records = run_bench(cfg, progress=not args.no_progress and sys.stderr.isatty(), partial=partial)
    write_results(records, out)
    partial.unlink(missing_ok=True)
    print(markdown_report(records))
    if not cfg.device.startswith("cuda"):
        print(committed_gpu_table({r["impl"] for r in records}))
    print(f"wrote {out}/bench.json, bench.md, bench.png ({len(records)} records)")
    return 0
