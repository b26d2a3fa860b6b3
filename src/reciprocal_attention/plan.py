"""How a :class:`~reciprocal_attention.attention.ReciprocalAttention` runs: its plan, chosen once.

A plan names the three steps of the forward pass that have several implementations:

* ``qkv``: the projection to ``[Q~ | K~ | V]``. ``"linear"``: ``c_attn`` as it is (``standard``, ``full``, and every
  variant on the reference backend). ``"fold"``: the weight-space fold in PyTorch ops (RA-SPEC 3.2), then one GEMM.
  ``"fused_fold"``: the same fold in Triton kernels, and on eager training calls the GEMM and the fold's backward as
  one autograd node (``ops.folded_linear``).
* ``core``: the attention. ``"sdpa"`` (PyTorch SDPA on folded inputs), ``"triton"`` (the fused kernels of
  ``ops.flash``: a learned column bias with its gradient, full-rank ``S + S^T``), ``"reference"`` (the float64 oracle).
* ``bias``: where the discoverability column bias goes. ``"none"``; ``"channel"`` / ``"channel_fused"`` (written
  into the head's reserved Q/K feature after the GEMM, RA-SPEC 3.3; fused = Triton kernels on eager CUDA calls);
  ``"feature"`` (one extra Q/K feature for SDPA); ``"kernel"`` (inside the Triton kernel); ``"logits"`` (reference).

The plan depends only on the module's configuration and its parameters' device and dtype, so it is made at
construction and again on ``.to()``/``.cuda()``/``.double()``; ``forward`` never decides (a decision made by Python
that torch.compile cannot trace would split the compiled graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from . import fold as _fold
from .functional import TRITON_HEAD_DIMS
from .ops import TRITON_AVAILABLE


class AttentionConfig(Protocol):
    """What a plan reads of the module (``ReciprocalAttention``'s configuration attributes)."""

    backend: str
    variant: str
    discoverability: Optional[str]
    bias_channel: bool
    head_dim: int
    dropout: float

QKV_PLANS = ("linear", "fold", "fused_fold")
CORE_PLANS = ("sdpa", "triton", "reference")
BIAS_PLANS = ("none", "channel", "channel_fused", "feature", "kernel", "logits")


@dataclass(frozen=True)
class Plan:
    """The implementation of each forward step and why (see the module docstring)."""

    qkv: str
    core: str
    bias: str
    reason: str

    def __post_init__(self) -> None:
        for name, valid in (("qkv", QKV_PLANS), ("core", CORE_PLANS), ("bias", BIAS_PLANS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"plan {name} must be one of {valid}; got {getattr(self, name)!r}")


def fused_fold_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """The Triton fold kernels run on CUDA parameters of fp16/bf16/fp32 when Triton is installed."""
    return device.type == "cuda" and TRITON_AVAILABLE and dtype != torch.float64


def fused_channel_usable(device: torch.device) -> bool:
    """The Triton bias-channel kernels run on CUDA when Triton is installed (eager and CUDA-graph calls; under
    torch.compile the PyTorch form runs, which inductor fuses)."""
    return device.type == "cuda" and TRITON_AVAILABLE


def _core(m: AttentionConfig, device: torch.device) -> tuple[str, str]:
    """``(core, reason)`` for ``backend="auto"`` or the requested backend."""
    if m.backend != "auto":
        return m.backend, "requested explicitly"
    if m.discoverability is None and m.variant != "full":
        return "sdpa", "no column bias and no full-rank term: a standard SDPA kernel on the fold is fastest"
    if m.bias_channel:
        return "sdpa", "the column bias rides in the reserved Q/K feature: the baseline's SDPA kernel at width D"
    if device.type != "cuda":
        return "sdpa", f"the fused Triton kernels need CUDA; device is {device.type} (exact channel fold/padding)"
    if not TRITON_AVAILABLE:
        return "sdpa", "triton is not installed (exact channel fold/padding through SDPA instead)"
    if m.head_dim not in TRITON_HEAD_DIMS:
        return "sdpa", f"head width {m.head_dim} is not one the Triton kernel supports {TRITON_HEAD_DIMS}"
    if m.variant == "low_rank":
        return "sdpa", "low_rank has Q/K width D+R != V width D, which the Triton kernel does not take"
    if m.dropout > 0:
        return "sdpa", "attention dropout is not implemented in the Triton kernel"
    return "triton", "CUDA + column bias or full-rank S+S^T: the fused kernel computes it without T x T memory"


def choose_plan(m: AttentionConfig, device: torch.device, dtype: torch.dtype) -> Plan:
    """The plan of module ``m`` with parameters on ``device`` in ``dtype``."""
    core, reason = _core(m, device)
    folded = m.variant in _fold.FOLDED_VARIANTS and core != "reference"
    qkv = ("fused_fold" if fused_fold_usable(device, dtype) else "fold") if folded else "linear"
    if m.discoverability is None:
        bias = "none"
    elif core == "reference":
        bias = "logits"
    elif m.bias_channel and core == "sdpa":
        bias = "channel_fused" if fused_channel_usable(device) else "channel"
    else:
        bias = "kernel" if core == "triton" else "feature"
    return Plan(qkv=qkv, core=core, bias=bias, reason=reason)
