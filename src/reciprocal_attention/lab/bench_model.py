"""Whole-model benchmark (``ra bench --model gpt2``): the training step users run, and KV-cache decoding.

A training step is forward + backward + fused AdamW step + ``zero_grad(set_to_none=True)`` of GPT-2 small under
bf16 autocast with fp32 parameters. Each arm is timed in alternating rounds with its baseline in one process
(``standard`` for the project's ``GPT``; transformers' own ``GPT2LMHeadModel`` with SDPA for its ``convert_gpt2``
conversion) and its ratio is the median of the per-round ratios. Modes: ``eager``, ``compile``
(``torch.compile(model)``) and ``compile-cudagraphs`` (``mode="reduce-overhead"``: the compiled step replayed as a
CUDA graph). Peak memory is that of one step of the arm's model alone (the baseline's resident bytes subtracted).
Decoding: tokens/s of greedy generation with the KV cache (``B=1`` and ``B=8``). The command around it (options,
child processes, the result files): :mod:`reciprocal_attention.lab.bench_model_cli`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..model import GPT, GPTConfig
from .runtime import device_name

MODES = ("eager", "compile", "compile-cudagraphs")
PRESETS = ("standard", "ra", "ra_disc_channel", "seed", "low_rank", "full", "hf-gpt2")
# ``PRESET+VARIANT`` arms: the preset's model with one implementation choice changed, timed against the same baseline
# in the same process as the preset itself (the two ratios compare the choice); a process-wide variant
# (PROCESS_VARIANTS) is timed in child processes against their own baseline instead
ARM_VARIANTS = {"pytorch-fold": "the fold in PyTorch ops while torch.compile traces (ReciprocalAttention.traced_fold)",
                "static-launch": "the fold's Triton kernels launched by inductor's static CUDA launcher under "
                                 "torch.compile (off by default in torch, which launches user-defined Triton kernels "
                                 "through Triton's own launcher); process-wide, so timed in a child process against "
                                 "its own baseline"}
# variants that are a process-wide setting: the environment that makes it (read by torch._inductor.config at import,
# and inherited by inductor's compile workers, which get no config patches) and the inductor config it sets. Their
# arms run in child processes started with it; a process that has it times every compiled arm with it.
PROCESS_VARIANTS = {"static-launch": ({"TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS": "1"},
                                      "static_launch_user_defined_triton_kernels")}


def _process_variants_here() -> set[str]:
    """The process-wide variants whose environment this process was started with."""
    return {v for v, (env, _) in PROCESS_VARIANTS.items() if all(os.environ.get(k) == x for k, x in env.items())}


@dataclass
class ModelBenchConfig:
    """What to time. ``shapes``: ``(B, T)`` training shapes; ``presets``: arms (``standard`` is the baseline of the
    project's GPT; ``hf-gpt2`` is transformers' GPT-2 against its ``convert_gpt2`` conversion)."""

    size: str = "gpt2"
    presets: tuple[str, ...] = PRESETS
    modes: tuple[str, ...] = MODES
    shapes: tuple[tuple[int, int], ...] = ((8, 1024), (2, 4096))
    rounds: int = 7
    steps: int = 6
    warmup: int = 3
    decode_batches: tuple[int, ...] = (1, 8)
    decode_tokens: int = 256
    device: str = "cuda"
    overrides: dict[str, Any] = field(default_factory=dict)  # GPTConfig overrides (tests use tiny sizes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpt(cfg: ModelBenchConfig, preset: str, T: int, device: torch.device) -> nn.Module:
    preset, _, variant = preset.partition("+")
    if variant in PROCESS_VARIANTS:  # the model cannot carry a process-wide setting: never the plain preset by its name
        env, setting = PROCESS_VARIANTS[variant]
        import torch._inductor.config as inductor_config

        if variant not in _process_variants_here():
            raise RuntimeError(f"the arm {preset}+{variant} needs a process started with "
                               f"{' '.join(f'{k}={v}' for k, v in env.items())}")
        if getattr(inductor_config, setting, None) is not True:
            raise RuntimeError(f"the arm {preset}+{variant}: torch {torch.__version__} has no inductor setting "
                               f"{setting} (torch >= 2.8), or it is off in this process")
    gcfg = GPTConfig.from_preset(cfg.size, attn=preset, **{"block_size": max(T, 1024), **cfg.overrides})
    model = GPT(gcfg, seed=0).to(device)
    if variant == "pytorch-fold":
        for m in model.modules():
            if hasattr(m, "traced_fold"):
                m.traced_fold = "pytorch"
    return model


def _hf(cfg: ModelBenchConfig, converted: bool, T: int, device: torch.device) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..model import GPT_PRESETS

    n_layer, n_head, n_embd, _ = GPT_PRESETS[cfg.size]
    over = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, **cfg.overrides}
    hcfg = GPT2Config(n_layer=over["n_layer"], n_head=over["n_head"], n_embd=over["n_embd"],
                      n_positions=max(T, 1024), vocab_size=over.get("vocab_size", 50257),
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hcfg)
    if converted:
        from ..hf import convert_gpt2

        model = convert_gpt2(model)
    return model.to(device)


def _loss_fn(model: nn.Module, hf: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if hf:  # the loss outside transformers' loss_function, which breaks the compiled graph (plain GPT-2 too)
        return lambda idx, tgt: nn.functional.cross_entropy(model(input_ids=idx).logits.flatten(0, 1).float(),
                                                            tgt.flatten())
    return lambda idx, tgt: model(idx, tgt)[1]


class _Arm:
    """One model, its optimizer and its (possibly compiled) training step."""

    def __init__(self, model: nn.Module, hf: bool, mode: str, device: torch.device, vocab: int) -> None:
        self.model, self.device = model, device
        fused = {"fused": True} if device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
        if mode != "eager":  # what users write: torch.compile(model)
            model = torch.compile(model, mode="reduce-overhead" if mode == "compile-cudagraphs" else None)
        self.fwd, self.vocab = _loss_fn(model, hf), vocab
        self.compiled = mode != "eager"

    def step(self, idx: torch.Tensor, tgt: torch.Tensor) -> None:
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.device.type == "cuda" else \
            contextlib.nullcontext()
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with amp:
            loss = self.fwd(idx, tgt)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _time_steps(arm: _Arm, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> float:
    """Milliseconds per step over ``steps`` steps (CUDA events on the GPU, wall time on a CPU)."""
    dev = arm.device
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            arm.step(*batch)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        arm.step(*batch)
    return (time.perf_counter() - t0) * 1e3 / steps


def _peak_step_bytes(arm: _Arm, batch: tuple[torch.Tensor, torch.Tensor], resident_other: int) -> int | None:
    if arm.device.type != "cuda":
        return None
    _sync(arm.device)
    torch.cuda.reset_peak_memory_stats(arm.device)
    arm.step(*batch)
    _sync(arm.device)
    return int(torch.cuda.max_memory_allocated(arm.device) - resident_other)


def _resident(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    _sync(device)
    return int(torch.cuda.memory_allocated(device))


def _batch(B: int, T: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, vocab, (B, T), generator=gen).to(device)
    return idx, torch.roll(idx, -1, dims=1)


def warm(arm: _Arm, batch: tuple[torch.Tensor, torch.Tensor], steps: int, resident_other: int) -> int | None:
    """Compile/warm ``arm`` and return the peak bytes of one of its steps (``resident_other`` subtracted)."""
    for _ in range(steps):
        arm.step(*batch)
    return _peak_step_bytes(arm, batch, resident_other)


def time_pair(cfg: ModelBenchConfig, base: _Arm, arm: _Arm, batch: tuple[torch.Tensor, torch.Tensor]
              ) -> dict[str, Any]:
    """``rounds`` alternating rounds of ``steps`` steps each of the (warm) arm and its (warm) baseline."""
    base_ms, arm_ms, ratios = [], [], []
    for r in range(cfg.rounds):
        order = (base, arm) if r % 2 == 0 else (arm, base)
        got = {id(a): _time_steps(a, batch, cfg.steps) for a in order}
        base_ms.append(got[id(base)])
        arm_ms.append(got[id(arm)])
        ratios.append(arm_ms[-1] / base_ms[-1])
    B, T = batch[0].shape
    return {"ms_median": statistics.median(arm_ms), "ms_min": min(arm_ms), "ms_max": max(arm_ms),
            "baseline_ms_median": statistics.median(base_ms), "ratio_vs_baseline": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "tokens_per_s": B * T / (statistics.median(arm_ms) / 1e3)}


def _decode_tokens_per_s(model: nn.Module, hf: bool, B: int, n_new: int, device: torch.device,
                         vocab: int) -> float:
    prompt = torch.randint(0, min(1000, vocab), (B, 16), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.eval()
    with torch.no_grad(), amp:
        _sync(device)
        t0 = time.perf_counter()
        if hf:
            model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           pad_token_id=0)
        else:
            model.generate(prompt, max_new_tokens=n_new, temperature=0.0)
        _sync(device)
    return B * n_new / (time.perf_counter() - t0)


def decode_pair(cfg: ModelBenchConfig, base: nn.Module, arm: nn.Module, hf: bool, B: int,
                rounds: int = 5) -> dict[str, Any]:
    """Greedy KV-cache decoding tokens/s of ``arm`` against ``base``, alternating rounds (one full warm-up each).

    Host-bound decoding has occasional slow rounds (seen on an H100: one round of 5x the time), so the ratio is
    the median of per-round ratios over ``rounds`` rounds and its range is recorded."""
    device = torch.device(cfg.device)
    n, vocab = cfg.decode_tokens, cfg.overrides.get("vocab_size", 50257)
    for model in (base, arm):  # the full length: the first run over new key lengths is slower (~8x on an H100)
        _decode_tokens_per_s(model, hf, B, n, device, vocab)
    b, a = [], []
    for r in range(rounds):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            (b if which == 0 else a).append(_decode_tokens_per_s((base, arm)[which], hf, B, n, device, vocab))
    ratios = [x / y for x, y in zip(a, b)]
    return {"tokens_per_s": statistics.median(a), "baseline_tokens_per_s": statistics.median(b),
            "ratio_vs_baseline": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": rounds}


def _versions(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version}


def run_model_bench(cfg: ModelBenchConfig, log: Callable[[str], None] = print,
                    on_record: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every (preset, mode, shape) training-step record, then the decoding records. ``on_record(records)`` is
    called after each new record (the CLI writes the results so far: a run cut short keeps what it measured)."""
    device = torch.device(cfg.device)
    versions = _versions(device)
    vocab = cfg.overrides.get("vocab_size", 50257)
    records: list[dict[str, Any]] = []
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)  # one per arm's model
    for mode in cfg.modes:
        for B, T in cfg.shapes:
            batch = _batch(B, T, vocab, device)
            for hf in (False, True):
                arms = [p for p in cfg.presets if p != "standard" and (p == "hf-gpt2") == hf]
                if mode == "eager" and any("+" in p for p in arms):  # a variant of how torch.compile traces
                    log(f"  eager: skipping {', '.join(p for p in arms if '+' in p)} (the same eager model as its "
                        "preset)")
                    arms = [p for p in arms if "+" not in p]
                if not arms:
                    continue
                torch._dynamo.reset()
                start = _resident(device)
                base = _Arm(_hf(cfg, False, T, device) if hf else _gpt(cfg, "standard", T, device), hf, mode,
                            device, vocab)
                base_peak = warm(base, batch, cfg.warmup, start)
                resident = _resident(device)
                for preset in arms:
                    t0 = time.perf_counter()
                    arm = _Arm(_hf(cfg, True, T, device) if hf else _gpt(cfg, preset, T, device), hf, mode, device,
                               vocab)
                    peak = warm(arm, batch, cfg.warmup, resident)
                    rec = time_pair(cfg, base, arm, batch)
                    rec.update(kind="train_step", model="hf-gpt2" if hf else cfg.size,
                               preset="low_rank" if hf else preset, mode=mode, B=B, T=T, rounds=cfg.rounds,
                               steps=cfg.steps, peak_mem_bytes=peak, baseline_peak_mem_bytes=base_peak, **versions)
                    variant = preset.partition("+")[2]
                    if variant in PROCESS_VARIANTS:
                        rec["process_env"] = dict(PROCESS_VARIANTS[variant][0])
                    records.append(rec)
                    if on_record is not None:
                        on_record(records)
                    log(f"  {rec['model']:8s} {rec['preset']:16s} {mode:18s} {B}x{T:<5d} {rec['ms_median']:8.2f} ms  "
                        f"{rec['ratio_vs_baseline']:.3f}x  ({time.perf_counter() - t0:.0f} s)")
                    del arm
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                del base
    torch._dynamo.reset()
    for preset in [p for p in cfg.presets if p in ("ra", "hf-gpt2") and cfg.decode_batches]:
        hf = preset == "hf-gpt2"
        T = 1024
        base = _hf(cfg, False, T, device) if hf else _gpt(cfg, "standard", T, device)
        arm = _hf(cfg, True, T, device) if hf else _gpt(cfg, preset, T, device)
        for B in cfg.decode_batches:
            rec = decode_pair(cfg, base, arm, hf, B)
            rec.update(kind="decode", model="hf-gpt2" if hf else cfg.size, preset="low_rank" if hf else preset,
                       mode="eager", B=B, T=cfg.decode_tokens, ms_median=1e3 * B / rec["tokens_per_s"],
                       peak_mem_bytes=None, **versions)
            records.append(rec)
            if on_record is not None:
                on_record(records)
            log(f"  decode {rec['model']:8s} {rec['preset']:10s} B={B}: {rec['tokens_per_s']:.0f} tok/s "
                f"({rec['ratio_vs_baseline']:.3f}x)")
        del base, arm
    return records
