"""What a :class:`~reciprocal_attention.attention.ReciprocalAttention` is built from: the checks of its
arguments, its default RA-parameter init, and the named presets."""

from __future__ import annotations

from typing import Any

from . import fold as _fold
from .fold import GATES, VARIANTS, check_choice
from .functional import BACKENDS

DISCOVERABILITY = (None, "positional", "content")
PRESETS = ("standard", "seed", "ra", "ra_disc", "ra_disc_channel", "full", "low_rank", "output_gate")


def check_arguments(n_embd: int, n_head: int, rank: int, variant: str, gates: str,
                     routing_threshold: float | None, discoverability: str | None, dropout: float,
                     block_size: int, backend: str, bias_channel: bool) -> int:
    """Raise ``ValueError`` naming the first bad argument of :class:`ReciprocalAttention`; returns the head
    width ``D``."""
    for name, val in (("n_embd", n_embd), ("n_head", n_head), ("block_size", block_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int; got {val!r}")
    if n_embd % n_head != 0:
        raise ValueError(f"n_embd must be divisible by n_head; got n_embd={n_embd}, n_head={n_head}")
    check_choice("variant", variant, VARIANTS)
    check_choice("gates", gates, GATES)
    check_choice("discoverability", discoverability, DISCOVERABILITY)
    check_choice("backend", backend, BACKENDS)
    D = n_embd // n_head
    if variant in _fold.FOLDED_VARIANTS and (isinstance(rank, bool) or not isinstance(rank, int)
                                             or not 1 <= rank <= D - 1):
        raise ValueError(f"rank must be an int in [1, D-1] = [1, {D - 1}] (D = n_embd/n_head = {D}); "
                         f"got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    if bias_channel and (variant != "same_flop" or discoverability is None or routing_threshold is not None
                         or not isinstance(rank, int) or rank > D - 2):
        raise ValueError("bias_channel reserves one Q/K feature per head for the discoverability bias (RA-SPEC "
                         "3.3): it needs variant='same_flop', a discoverability kind, no routing and rank <= "
                         f"D-2 = {D - 2}; got variant={variant!r}, discoverability={discoverability!r}, "
                         f"routing_threshold={routing_threshold!r}, rank={rank!r}")
    if routing_threshold is not None and variant == "standard":
        raise ValueError("routing_threshold needs an RA variant (full, low_rank, same_flop); "
                         "variant='standard' has no w_rec to route on")
    return D


DEFAULT_INIT: dict[str, Any] = {"w_std": 1.0, "w_rec": 1.0, "w_disc": 1.0, "W_recip": "orthogonal"}

PRESET_ARGS: dict[str, dict[str, Any]] = {
    "standard": {"variant": "standard"},
    "seed": {"variant": "same_flop", "rank": 8, "gates": "seed", "routing_threshold": 0.1, "bias": False,
             "discoverability": None,
             "init": {"w_std": 0.5, "w_rec": 0.3, "w_disc": 0.2, "W_recip": 0.02, "seed_params": True}},
    "ra": {"variant": "same_flop", "rank": 8, "gates": "signed"},
    "ra_disc": {"variant": "same_flop", "rank": 8, "gates": "signed", "discoverability": "positional"},
    # RA-SPEC 3.3: R-1 = 7 reciprocal features + 1 bias feature, so the bias costs no width and no kernel change
    "ra_disc_channel": {"variant": "same_flop", "rank": 7, "gates": "signed", "discoverability": "positional",
                        "bias_channel": True},
    "full": {"variant": "full", "gates": "signed", "init": {"w_std": 1.0, "w_rec": 0.5}},
    "low_rank": {"variant": "low_rank", "rank": 8, "gates": "signed"},
    "output_gate": {"variant": "standard", "output_gate": True},
}
