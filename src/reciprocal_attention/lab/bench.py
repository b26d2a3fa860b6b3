"""``ra bench``: RA against the baseline attention block, by the protocol of RA-SPEC section 4.

Every arm is the same module boundary, ``c_attn -> attention -> c_proj``, timed with CUDA events after warm-up,
``repeats`` (>= 7) timings of ``inner`` calls each, reporting median/min/max per call. Baseline and RA run in the
same process on the same card; each RA arm's ratio is against the baseline on the same SDPA backend, pass, mode,
shape and precision. Modes: ``eager`` (plain calls; host-bound at these sizes, so each RA arm is timed in
alternating rounds with its baseline and the ratio is the median of the per-round ratios), ``graph`` (one CUDA graph
captured, then replayed: pure GPU time) and ``compile`` (``torch.compile``). Passes: ``fwd`` (under
``no_grad``), ``fwd+bwd`` (parameter and input gradients), ``step`` (``fwd+bwd`` plus a fused AdamW step, so a
folded weight is rebuilt every step).

On a CPU the same code runs at small shapes, eager only, and says so: CPU numbers are not the protocol's numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
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

from .. import fold as _fold
from ..attention import ReciprocalAttention

log = logging.getLogger(__name__)

PASSES = ("fwd", "fwd+bwd", "step")
MODES = ("eager", "graph", "compile")
HEADS_PCT = {100: (0.0, None), 50: (0.25, (6, 0.2, 0.4)), 25: (0.35, (9, 0.3, 0.4))}  # GPT-2 small, 12 heads


# --------------------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------------------

class _WrappedBlock(nn.Module):
    """A peer block around a ReciprocalAttention's parameters: the same c_attn/c_proj boundary, another core."""

    def __init__(self, ra: ReciprocalAttention) -> None:
        super().__init__()
        self.ra = ra

    def heads(self, x: Tensor, folded: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` as ``[B, H, T, D]`` from ``c_attn`` (or from the weight-space folded ``c_attn``)."""
        B, T, C = x.shape
        w, b = self.ra.folded_weight(out_dtype=None) if folded else (self.ra.c_attn.weight, self.ra.c_attn.bias)
        q, k, v = (t.view(B, T, self.ra.n_head, self.ra.head_dim).transpose(1, 2)
                   for t in F.linear(x, w, b).split(C, 2))
        return q, k, v

    def project(self, y: Tensor) -> Tensor:
        """``[B, H, T, D] -> c_proj -> [B, T, C]``."""
        B, H, T, D = y.shape
        return self.ra.c_proj(y.transpose(1, 2).reshape(B, T, H * D))

    def column_bias(self, T: int) -> Tensor:
        return self.ra.w_disc.view(-1, 1) * self.ra.d_bias[:, :T]


class SeedBlock(_WrappedBlock):
    """The seed's RA Ultimate v2 block as it ran: c_attn -> activation fold with routed packs -> c_proj."""

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.contiguous() for t in self.heads(x))
        ra = self.ra
        return self.project(_fold.seed_packed_attention(q, k, v, ra.w_std, ra.w_rec, ra.W_recip,
                                                        threshold=ra.routing_threshold))


class ActivationFoldBlock(_WrappedBlock):
    """same_flop through the activation-space fold (RA-SPEC 3.1), no routing packs: the readable baseline."""

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.heads(x)
        ra = self.ra
        qf, kf = _fold.activation_fold(q, k, ra.W_recip, *ra._gate_sides(), ra._routed(), "same_flop")
        return self.project(F.scaled_dot_product_attention(qf, kf, v, is_causal=True,
                                                           scale=1.0 / math.sqrt(ra.head_dim)))


class MaskBiasBlock(_WrappedBlock):
    """Peer: RA fold + learned column bias through SDPA with a materialised causal+bias ``[1, H, T, T]`` mask."""

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        q, k, v = self.heads(x, folded=True)
        causal = torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        mask = causal.unsqueeze(0) + self.column_bias(T).to(x.dtype).unsqueeze(1)  # [H, T, T]
        return self.project(F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0),
                                                           scale=1.0 / math.sqrt(self.ra.head_dim)))


class FlexBiasBlock(_WrappedBlock):
    """Peer: RA fold + learned column bias through FlexAttention (compiled), the bias a tensor requiring grad."""

    def __init__(self, ra: ReciprocalAttention) -> None:
        super().__init__(ra)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self._flex = torch.compile(flex_attention)
        self._create_block_mask = create_block_mask
        self._masks: dict[tuple, Any] = {}

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        key = (T, x.device)
        if key not in self._masks:
            self._masks[key] = self._create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T,
                                                       device=x.device)
        q, k, v = self.heads(x, folded=True)
        bias = self.column_bias(T)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, kv_idx]

        return self.project(self._flex(q, k, v, score_mod=score_mod, block_mask=self._masks[key],
                                       scale=1.0 / math.sqrt(self.ra.head_dim)))


@dataclass
class Arm:
    """One benchmark row: how to build the block, which SDPA backend it runs under, what it is compared with."""

    impl: str
    variant: str
    build: Callable[[int, int, int, bool], nn.Module]  # (C, H, block_size, bias) -> module
    sdpa: str = "flash"  # SDPA backend context: flash | cudnn | efficient | math | any
    baseline: str = "baseline_flash"
    heads_pct: int = 100
    modes: tuple[str, ...] = MODES
    passes: tuple[str, ...] = PASSES
    note: str = ""
    syncs_host: bool = False
    tags: set[str] = field(default_factory=set)


def _set_heads(ra: ReciprocalAttention, heads_pct: int) -> ReciprocalAttention:
    """Apply the seed's 100/50/25% RA-head configuration (thresholds 0.0/0.25/0.35, w_rec settings)."""
    thr, split = HEADS_PCT[heads_pct]
    ra.routing_threshold = thr
    if split is not None:
        n, lo, hi = split
        n = round(n * ra.n_head / 12)
        with torch.no_grad():
            ra.w_rec[:n] = lo
            ra.w_rec[n:] = hi
    return ra


def _ra(preset: str, backend: str = "sdpa", **kw: Any) -> Callable[[int, int, int, bool], nn.Module]:
    def build(C: int, H: int, block: int, bias: bool) -> nn.Module:
        return ReciprocalAttention.from_preset(preset, n_embd=C, n_head=H, block_size=block, bias=bias,
                                               backend=backend, **kw)
    return build


def _seed_routed(heads_pct: int, wrap: type | None = None, backend: str = "sdpa"):
    def build(C: int, H: int, block: int, bias: bool) -> nn.Module:
        ra = ReciprocalAttention.from_preset("seed", n_embd=C, n_head=H, block_size=block, bias=bias, backend=backend)
        ra = _set_heads(ra, heads_pct)
        return wrap(ra) if wrap is not None else ra
    return build


def _with_bias(preset: str, wrap: type | None = None, backend: str = "sdpa"):
    def build(C: int, H: int, block: int, bias: bool) -> nn.Module:
        ra = ReciprocalAttention.from_preset(preset, n_embd=C, n_head=H, block_size=block, bias=bias, backend=backend)
        with torch.no_grad():
            if hasattr(ra, "d_bias"):
                ra.d_bias.normal_(0.0, 0.5)
        return wrap(ra) if wrap is not None else ra
    return build


def default_arms(groups: set[str]) -> list[Arm]:
    """The arm list; ``groups`` selects among ``core`` (issue 3), ``heads``, ``evolution``, ``kernels`` (issue 4)."""
    arms = [
        Arm("baseline_flash", "standard", _ra("standard"), sdpa="flash", baseline="baseline_flash"),
        Arm("baseline_cudnn", "standard", _ra("standard"), sdpa="cudnn", baseline="baseline_cudnn"),
        Arm("ra_fast", "same_flop", _ra("ra"), sdpa="flash", baseline="baseline_flash",
            note="weight-space fold, fused fold kernels"),
        Arm("ra_fast", "same_flop", _ra("ra"), sdpa="cudnn", baseline="baseline_cudnn",
            note="weight-space fold, fused fold kernels"),
        Arm("seed_as_ran", "same_flop", _seed_routed(100, SeedBlock), sdpa="flash", modes=("eager",),
            syncs_host=True, note="activation fold + routed packs; .item() syncs the host, so no CUDA graph"),
    ]
    if "heads" in groups:
        for pct in (50, 25):
            arms.append(Arm("seed_as_ran", "same_flop", _seed_routed(pct, SeedBlock), sdpa="flash", heads_pct=pct,
                            modes=("eager",), syncs_host=True))
        for pct in (100, 50, 25):
            for sdpa in ("flash", "cudnn"):
                arms.append(Arm("seed_fast", "same_flop", _seed_routed(pct), sdpa=sdpa, heads_pct=pct,
                                baseline=f"baseline_{sdpa}", note="seed preset (routing on) on the fused fold"))
    if "evolution" in groups:
        arms += [
            Arm("open_coded", "full", _ra("full", backend="reference"), sdpa="any", modes=("eager", "graph"),
                note="materialised T x T logits, S + S^T"),
            Arm("full_sdpa", "full", _ra("full", backend="sdpa"), sdpa="flash", note="[Q,K].[K,Q], V zero-padded"),
            Arm("low_rank_fold", "low_rank", _ra("low_rank"), sdpa="flash", note="weight fold, width D+R"),
            Arm("same_flop_act_fold", "same_flop", _seed_routed(100, ActivationFoldBlock), sdpa="flash",
                note="activation fold, no packs"),
        ]
    if "kernels" in groups:
        arms += [
            Arm("triton_plain", "same_flop", _ra("ra", backend="triton"), sdpa="any", baseline="baseline_cudnn",
                note="fused Triton attention, no bias"),
            Arm("triton_bias", "same_flop", _with_bias("ra_disc", backend="triton"), sdpa="any",
                baseline="baseline_cudnn", note="fused Triton attention + learned column bias"),
            Arm("channel_bias", "same_flop", _with_bias("ra_disc_channel", backend="sdpa"), sdpa="cudnn",
                baseline="baseline_cudnn", note="bias in the reserved Q/K feature (RA-SPEC 3.3: R-1 + 1), width D"),
            Arm("channel_bias", "same_flop", _with_bias("ra_disc_channel", backend="sdpa"), sdpa="flash",
                baseline="baseline_flash", note="bias in the reserved Q/K feature (RA-SPEC 3.3: R-1 + 1), width D"),
            Arm("channel_fold_bias", "same_flop", _with_bias("ra_disc", backend="sdpa"), sdpa="cudnn",
                baseline="baseline_cudnn", note="bias in one extra Q/K feature (width 72)"),
            Arm("full_triton", "full", _ra("full", backend="triton"), sdpa="any", baseline="baseline_cudnn",
                note="fused S + S^T, no V padding"),
            Arm("flex_bias", "same_flop", _with_bias("ra_disc", FlexBiasBlock), sdpa="any", baseline="baseline_cudnn",
                modes=("eager", "graph"), note="FlexAttention, learned bias captured as a tensor"),
            Arm("sdpa_mask_bias", "same_flop", _with_bias("ra_disc", MaskBiasBlock), sdpa="efficient",
                baseline="baseline_cudnn", modes=("eager", "graph"), note="materialised causal+bias mask"),
        ]
    return arms


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


def run_bench(cfg: BenchConfig, progress: bool = True, partial: Path | None = None) -> list[dict[str, Any]]:
    """Run the plan and return one record per (arm, shape, pass, mode); ratios filled against the baselines.

    ``partial``: rewrite this JSON file after every record, so a run cut by a time limit keeps what it measured
    (``ra bench --render DIR`` renders it once renamed to ``bench.json``)."""
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    if not cuda:
        print("ra bench: no CUDA device — running small CPU shapes in eager mode only. These numbers are not the "
              "protocol's (RA-SPEC section 4 is defined on a GPU); they show the harness works.", flush=True)
    arms = default_arms(cfg.groups)
    if cfg.arms is not None:
        arms = [a for a in arms if a.impl in cfg.arms or a.impl.startswith("baseline")]
    if not cuda:
        arms = [a for a in arms if a.sdpa in ("flash", "any") and not a.impl.startswith(("triton", "full_triton",
                                                                                        "flex"))]
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
    speed drifts by tens of percent within minutes on the lent machine: unpaired eager ratios swing 0.7x-4.8x;
    graph replays drift by ~1%, the size of the effects measured at T=1024). The baseline's prepared callable (its
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
        out.update({"ratio_paired": statistics.median(t / b for t, b in zip(times, base_times)),
                    "paired_baseline_ms_median": statistics.median(base_times)})
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
# Reports
# --------------------------------------------------------------------------------------------------------------

def _fmt(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def markdown_report(records: list[dict[str, Any]]) -> str:
    """Tables shaped like the seed's "Full Results" and "Performance Evolution", plus the full record list."""
    if not records:
        return "# ra bench\n\nno records\n"
    v = records[0]
    paired = sorted({r["mode"] for r in records if r.get("ratio_paired") is not None})
    lines = ["# ra bench: RA vs the baseline attention block",
             "", f"Device: **{v['device']}**; torch {v['torch']}, triton {v['triton']}, CUDA {v.get('cuda')}; "
             f"precision {v['precision']}; GPT-2 biases: {v['bias']}. Median ms per call (min-max), ratio against "
             "the baseline on the same SDPA backend, pass, mode and shape"
             + (f"; {' and '.join(paired)} ratios are paired (timed in alternating rounds with the baseline)"
                if paired else "") + ". Graph = CUDA-graph replay (pure GPU time).",
             ""]
    by = {}
    for r in records:
        by.setdefault((r["impl"], r["sdpa"], r["heads_pct"], r["B"], r["T"], r["C"], r["pass"], r["mode"]), r)

    def cell(impl, sdpa, pct, B, T, C, pass_, mode, ratio=True):
        r = by.get((impl, sdpa, pct, B, T, C, pass_, mode))
        if r is None:
            return "n/a"
        if r.get("ms_median") is None:
            return "failed" if r.get("error") else "n/a"
        s = f"{r['ms_median']:.3f}"
        if ratio and r.get("ratio_vs_baseline") is not None and not impl.startswith("baseline"):
            s += f" ({r['ratio_vs_baseline']:.2f}x)"
        return s

    from collections import Counter

    fB, fT, fC = Counter((r["B"], r["T"], r["C"]) for r in records if r.get("scope") != "core").most_common(1)[0][0]
    lines += [f"## Full Results (block B={fB}, T={fT}, C={fC})", "",
              "| configuration | backend | eager fwd | graph fwd | graph fwd+bwd | graph step | compile fwd | "
              "compile fwd+bwd |", "|---|---|---|---|---|---|---|---|"]
    rows = sorted({(r["impl"], r["sdpa"], r["heads_pct"]) for r in records if (r["B"], r["T"], r["C"]) == (fB, fT, fC)
                   and r.get("scope") != "core"}, key=lambda k: (not k[0].startswith("baseline"), k[0], -k[2], k[1]))
    for impl, sdpa, pct in rows:
        cells = [cell(impl, sdpa, pct, fB, fT, fC, p, m) for p, m in
                 (("fwd", "eager"), ("fwd", "graph"), ("fwd+bwd", "graph"), ("step", "graph"), ("fwd", "compile"),
                  ("fwd+bwd", "compile"))]
        label = impl if impl.startswith("baseline") else f"{impl} ({pct}% RA heads)"
        lines.append(f"| {label} | {sdpa} | " + " | ".join(cells) + " |")
    lines += ["", f"## Performance Evolution (graph fwd+bwd, B={fB}, T={fT}; eager fwd where a row cannot be graphed)",
              "",
              "| implementation | ms | vs baseline (flash) | note |", "|---|---|---|---|"]
    for impl in ("open_coded", "full_sdpa", "low_rank_fold", "same_flop_act_fold", "seed_as_ran", "ra_fast"):
        sdpa = "flash" if impl != "open_coded" else "any"
        r = by.get((impl, sdpa, 100, fB, fT, fC, "fwd+bwd", "graph"))
        if r is None or r.get("ms_median") is None:
            r = by.get((impl, sdpa, 100, fB, fT, fC, "fwd", "eager"))
        if r is None:
            continue
        lines.append(f"| {impl} ({r['pass']} {r['mode']}) | {_fmt(r.get('ms_median'))} | "
                     f"{_fmt(r.get('ratio_vs_baseline'), 2)}x | {r.get('note', '')} |")
    lines += ["", "## Ratio vs T and width (graph mode)", "",
              "| impl | backend | B x T | C | fwd | fwd+bwd | step | peak mem (fwd+bwd) vs baseline |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted({(r["impl"], r["sdpa"], r["B"], r["T"], r["C"]) for r in records if r["mode"] == "graph"
                     and r["heads_pct"] == 100 and r.get("scope") != "core" and not r["impl"].startswith("baseline")},
                    key=lambda k: (k[0], k[1], k[4], k[3])):
        impl, sdpa, B, T, C = r
        rs = [by.get((impl, sdpa, 100, B, T, C, p, "graph")) for p in PASSES]
        ratios = [_fmt(x.get("ratio_vs_baseline"), 3) if x else "-" for x in rs]
        mem = _fmt(rs[1].get("mem_ratio_vs_baseline"), 3) if rs[1] else "-"
        lines.append(f"| {impl} | {sdpa} | {B} x {T} | {C} | " + " | ".join(ratios) + f" | {mem} |")
    core = [r for r in records if r.get("scope") == "core"]
    if core:
        lines += ["", "## Attention core TFLOP/s (causal, D=64, H=12, bf16, graph; FLOPs 4BHT^2D/2 fwd, x3.5 fwd+bwd)",
                  "", "| impl | B x T | pass | ms | TFLOP/s | time vs cuDNN |", "|---|---|---|---|---|---|"]
        for r in core:
            lines.append(f"| {r['impl']} | {r['B']} x {r['T']} | {r['pass']} | {_fmt(r.get('ms_median'))} | "
                         f"{_fmt(r.get('tflops'), 1)} | {_fmt(r.get('ratio_vs_baseline'), 2)}x |")
    errs = [r for r in records if r.get("error")]
    if errs:
        lines += ["", "## Arms that failed (recorded, not dropped)", ""]
        lines += [f"- {r['impl']} ({r['sdpa']}) {r['B']}x{r['T']} C={r['C']} {r['pass']} {r['mode']}: {r['error']}"
                  for r in errs]
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of graph-mode ratios against the baseline at each shape (fwd, fwd+bwd, step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["mode"] == "graph" and r.get("ratio_vs_baseline") and r["heads_pct"] == 100
            and r.get("scope") != "core" and not r["impl"].startswith("baseline") and r["C"] == 768]
    if not rows:
        rows = [r for r in records if r.get("ratio_vs_baseline") and not r["impl"].startswith("baseline")]
    labels = sorted({(r["impl"], r["sdpa"]) for r in rows})
    shapes = sorted({(r["B"], r["T"]) for r in rows}, key=lambda s: s[1])
    fig, axes = plt.subplots(1, len(PASSES), figsize=(6 * len(PASSES), 0.45 * len(labels) * max(1, len(shapes)) + 2),
                             squeeze=False)
    for ax, pass_ in zip(axes[0], PASSES):
        ys, vals, names = [], [], []
        for i, (impl, sdpa) in enumerate(labels):
            for j, (B, T) in enumerate(shapes):
                r = next((r for r in rows if (r["impl"], r["sdpa"], r["B"], r["T"], r["pass"]) ==
                          (impl, sdpa, B, T, pass_)), None)
                if r is None:
                    continue
                ys.append(len(ys))
                vals.append(r["ratio_vs_baseline"])
                names.append(f"{impl}/{sdpa} {B}x{T}")
        ax.barh(ys, vals, color=["tab:green" if v <= 1.03 else "tab:orange" if v <= 1.6 else "tab:red" for v in vals])
        ax.set_yticks(ys, names, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{pass_} ({rows[0]['mode'] if rows else ''}) time / baseline")
    dev = records[0]["device"] if records else ""
    fig.suptitle(f"RA block vs baseline - {dev}, torch {records[0]['torch'] if records else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(records: list[dict[str, Any]], out_dir: Path) -> None:
    """``bench.json``, ``bench.md`` and ``bench.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "bench.json.tmp"
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, out_dir / "bench.json")
    (out_dir / "bench.md").write_text(markdown_report(records))
    plot(records, out_dir / "bench.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ra bench", description="Benchmark RA against the baseline block (RA-SPEC 4).")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/local"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--groups", default="core,heads,evolution,kernels",
                    help="comma list of: core, heads, evolution, kernels")
    ap.add_argument("--shapes", default=None, help="e.g. 8x1024,2x4096,1x8192")
    ap.add_argument("--arms", default=None, help="only these impls, e.g. ra_fast,channel_bias (baselines always run)")
    ap.add_argument("--widths", default=None, help="scaling widths C/H, e.g. 1024/16,1280/20 ('' for none)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--precision", choices=("bf16", "amp"), default="bf16")
    ap.add_argument("--no-bias", action="store_true", help="bias-free c_attn/c_proj (the seed's table)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--render", type=Path, default=None,
                    help="re-render bench.md/bench.png from an existing bench.json in this folder (no timing)")
    args = ap.parse_args(argv)
    if args.render is not None:
        records = json.loads((args.render / "bench.json").read_text())
        fill_ratios(records)
        write_results(records, args.render)
        print(f"re-rendered {args.render}/bench.md and bench.png from {len(records)} records")
        return 0
    if args.repeats < 1 or args.inner < 1:
        ap.error("--repeats and --inner must be >= 1")
    cfg = BenchConfig(device=args.device, groups=set(args.groups.split(",")), precision=args.precision,
                      bias=not args.no_bias, repeats=args.repeats, inner=args.inner,
                      modes=tuple(args.modes.split(",")), passes=tuple(args.passes.split(",")),
                      arms=set(args.arms.split(",")) if args.arms else None)
    bad = set(cfg.modes) - set(MODES) | set(cfg.passes) - set(PASSES)
    if bad:
        ap.error(f"unknown mode/pass {sorted(bad)}; modes: {MODES}, passes: {PASSES}")
    if args.shapes:
        cfg.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        cfg.full_matrix_shape = cfg.shapes[0]
    if args.widths is not None:
        cfg.scaling_widths = [tuple(int(v) for v in s.split("/")) for s in args.widths.split(",") if s]
    if not cfg.device.startswith("cuda"):
        cfg.shapes = cfg.shapes if args.shapes else [(2, 64), (1, 128)]
        cfg.full_matrix_shape = cfg.shapes[0]
        cfg.widths = [(64, 4)]
        cfg.scaling_widths = [] if args.widths is None else cfg.scaling_widths
        cfg.modes = ("eager",)
        cfg.precision = "fp32" if args.precision == "bf16" else args.precision
        cfg.repeats, cfg.inner, cfg.warmup = min(cfg.repeats, 7), min(cfg.inner, 3), 1
    partial = args.out / "bench.partial.json"
    records = run_bench(cfg, progress=not args.no_progress and sys.stderr.isatty(), partial=partial)
    write_results(records, args.out)
    partial.unlink(missing_ok=True)
    print(markdown_report(records))
    print(f"wrote {args.out}/bench.json, bench.md, bench.png ({len(records)} records)")
    return 0
