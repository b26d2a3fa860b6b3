"""The arms of ``ra bench``: what is timed (docs/RA-SPEC.md section 4). Every arm is the same module boundary,
``c_attn -> attention -> c_proj``, built at a shape: the project's module with a preset and backend, or a peer block
around its parameters with another attention core (the seed's own algorithm, the activation fold, the bias as an
SDPA mask or through FlexAttention). :mod:`.bench` times them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import fold as _fold
from ..attention import ReciprocalAttention
from .bench_report import PASSES
from .seed_algorithm import seed_packed_attention

MODES = ("eager", "graph", "compile")
HEADS_PCT = {100: (0.0, None), 50: (0.25, (6, 0.2, 0.4)), 25: (0.35, (9, 0.3, 0.4))}  # GPT-2 small, 12 heads



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
        return self.project(seed_packed_attention(q, k, v, ra.w_std, ra.w_rec, ra.W_recip,
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
    """The arm list: the ``core`` arms always, plus those of the ``groups`` named among ``heads`` (the seed's
    100/50/25% RA-head settings), ``evolution`` (earlier designs) and ``kernels`` (fused kernels and bias peers)."""
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
