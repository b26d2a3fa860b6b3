"""The float64 oracle: the exact math of every Reciprocal Attention variant (RA-SPEC section 2).

Short and obviously right, not fast: it materialises the ``[B, H, T, T]`` logits. Every fast path in this
package is tested against these functions in float64. Works in any float dtype and on any device, with full
autograd.

Logits (for ``j <= i``; ``-inf`` above the diagonal), with ``a_h``/``b_h`` the gate coefficients of
``w_std``/``w_rec`` (see :func:`gate_coefficient`) and ``c_hj`` an optional column bias:

=============  ==========================================================================
``standard``   ``scale * q_i.k_j``
``full``       ``scale * (a_h q_i.k_j + b_h q_j.k_i) + c_hj``
``low_rank``   ``scale * (a_h q_i.k_j + b_h (k_i W).(q_j W)) + c_hj``
``same_flop``  ``scale * (a_h q_i[:Ds].k_j[:Ds] + b_h (k_i W).(q_j W)) + c_hj``, ``Ds = D - R``
=============  ==========================================================================

Head routing (``routing_threshold`` not None): a head with ``w_rec[h] <= threshold`` uses
``scale * a_h * q_i.k_j`` over the full head width instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

VARIANTS = ("standard", "full", "low_rank", "same_flop")
GATES = ("seed", "signed")
SEED_GATE_FLOOR = 1e-8


def check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    """Raise a ValueError naming ``name`` and listing the valid values unless ``value`` is one of them."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def gate_coefficient(w: Tensor, gates: str) -> Tensor:
    """The coefficient a gate parameter ``w`` puts on its logit term: ``w`` (``signed``) or ``clamp_min(w, 1e-8)``
    (``seed``: ``sqrt(clamp_min(w, 1e-8))`` on each side, so zero gradient for ``w <= 1e-8``)."""
    check_choice("gates", gates, GATES)
    return w.clamp_min(SEED_GATE_FLOOR) if gates == "seed" else w


def _per_head(x: Tensor) -> Tensor:
    """``[H]`` -> ``[1, H, 1, 1]`` for broadcasting against ``[B, H, T, T]``."""
    return x.view(1, -1, 1, 1)


def causal_mask(T: int, device: torch.device) -> Tensor:
    """``[T, T]`` boolean mask, True where key column ``j`` is visible from query row ``i`` (``j <= i``)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def column_bias_4d(col_bias: Tensor, B: int, H: int, T: int) -> Tensor:
    """Broadcast a column bias of shape ``[H, T]`` or ``[B, H, T]`` to ``[B or 1, H, 1, T]``."""
    if col_bias.dim() == 2 and tuple(col_bias.shape) == (H, T):
        return col_bias.view(1, H, 1, T)
    if col_bias.dim() == 3 and tuple(col_bias.shape) == (B, H, T):
        return col_bias.view(B, H, 1, T)
    raise ValueError(f"col_bias must have shape [H, T]=[{H}, {T}] or [B, H, T]=[{B}, {H}, {T}]; "
                     f"got {list(col_bias.shape)}")


def ra_logits(
    q: Tensor,
    k: Tensor,
    *,
    variant: str = "standard",
    W: Tensor | None = None,
    w_std: Tensor | None = None,
    w_rec: Tensor | None = None,
    gates: str = "signed",
    routing_threshold: float | None = None,
    col_bias: Tensor | None = None,
    scale: float | None = None,
    d_std: int | None = None,
) -> Tensor:
    """Causal RA logits ``[B, H, T, T]`` for ``q, k`` of shape ``[B, H, T, D]`` (``-inf`` where ``j > i``).

    ``W`` (``[D, R]``) is needed by ``low_rank``/``same_flop``; ``w_std``/``w_rec`` (``[H]``) by every variant
    except ``standard``. ``scale`` defaults to ``1/sqrt(D)``. ``d_std``: features of the standard term of
    ``same_flop`` (default ``D - R``; ``D - R - 1`` when one feature carries the column bias, RA-SPEC 3.3).
    """
    check_choice("variant", variant, VARIANTS)
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both have shape [B, H, T, D]; got {list(q.shape)} and {list(k.shape)}")
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if variant == "standard":
        logits = scale * (q @ k.transpose(-1, -2))
    else:
        if w_std is None or w_rec is None:
            raise ValueError(f"variant {variant!r} needs the gates w_std and w_rec (shape [H]={H})")
        a = _per_head(gate_coefficient(w_std, gates))
        b = _per_head(gate_coefficient(w_rec, gates))
        if variant == "full":
            s = q @ k.transpose(-1, -2)
            logits = scale * (a * s + b * s.transpose(-1, -2))
        else:
            if W is None or W.dim() != 2 or W.shape[0] != D:
                raise ValueError(f"variant {variant!r} needs W of shape [D, R] with D={D}")
            R = W.shape[1]
            if d_std is None:
                d_std = D if variant == "low_rank" else D - R
            elif variant != "same_flop" or not 1 <= d_std <= D - R:
                raise ValueError(f"d_std applies to same_flop and must be in [1, D-R] = [1, {D - R}]; got {d_std}")
            std = q[..., :d_std] @ k[..., :d_std].transpose(-1, -2)
            rec = (k @ W) @ (q @ W).transpose(-1, -2)  # rec_ij = (k_i W).(q_j W)
            logits = scale * (a * std + b * rec)
        if routing_threshold is not None:  # heads with w_rec <= threshold take the standard logit over full D
            plain = scale * a * (q @ k.transpose(-1, -2))
            logits = torch.where(_per_head(w_rec.detach() <= routing_threshold), plain, logits)
    if col_bias is not None:
        logits = logits + column_bias_4d(col_bias, B, H, T)
    return logits.masked_fill(~causal_mask(T, q.device), float("-inf"))


def ra_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """``softmax(ra_logits(q, k, **kwargs)) @ v`` -> ``[B, H, T, Dv]``. Keyword arguments as :func:`ra_logits`."""
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape [B, H, T, Dv] matching q's [B, H, T]={list(q.shape[:3])}; "
                         f"got {list(v.shape)}")
    return torch.softmax(ra_logits(q, k, **kwargs), dim=-1) @ v


def discoverability_bias(
    kind: str,
    w_disc: Tensor,
    *,
    d_bias: Tensor | None = None,
    u: Tensor | None = None,
    k: Tensor | None = None,
    T: int | None = None,
    center: bool = False,
) -> Tensor:
    """The discoverability column bias ``c_hj``.

    ``positional``: ``w_disc[h] * d_bias[h, j]`` for ``j < T`` -> ``[H, T]``. With ``center=True`` the mean over
    ``j < T`` is subtracted first, as the seed did (a softmax no-op in the full causal softmax).
    ``content``: ``w_disc[h] * <k_j, u_h>`` for keys ``k`` of shape ``[B, H, T, D]`` -> ``[B, H, T]``.
    """
    check_choice("discoverability", kind, ("positional", "content"))
    if kind == "positional":
        if d_bias is None or T is None:
            raise ValueError("positional discoverability needs d_bias [H, block_size] and T")
        d = d_bias[:, :T]
        if center:
            d = d - d.mean(dim=-1, keepdim=True)
        return w_disc.view(-1, 1) * d
    if u is None or k is None:
        raise ValueError("content discoverability needs u [H, D] and keys k [B, H, T, D]")
    return w_disc.view(1, -1, 1) * torch.einsum("bhtd,hd->bht", k, u)
