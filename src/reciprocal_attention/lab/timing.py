"""How every benchmark here times a callable: CUDA events after warm-up (``perf_counter`` on a CPU), ``repeats``
timings of ``inner`` back-to-back calls, paired rounds that alternate two callables, CUDA-graph capture, one SDPA
backend at a time, and the versions a record names.
"""

from __future__ import annotations

import contextlib
import platform
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor


def sdpa_context(name: str):
    """Context manager restricting SDPA to one backend (``any`` leaves PyTorch's choice)."""
    if name == "any":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def make_step(module: nn.Module, x: Tensor, pass_: str) -> Callable[[], None]:
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


def machine_versions() -> dict[str, str]:
    """Device, torch, triton, CUDA and Python versions: what every record names."""
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    return {"device": dev, "torch": torch.__version__, "triton": triton_v,
            "cuda": torch.version.cuda or "none", "python": platform.python_version()}


def warm_workspaces(device: torch.device) -> None:
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
