"""Generation caches: per layer, the keys ``K~`` and values ``V`` that
:meth:`~reciprocal_attention.attention.ReciprocalAttention.project_heads` made; per model, one per block.

Every RA variant's logit for key ``j`` depends on position ``j`` only through per-position vectors (the folded
key, and the column bias in its extra feature), so caching them lets new queries attend exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerKVCache:
    """Per-layer generation cache of the keys ``K~`` and values ``V`` ``[B, H, T, .]`` of the positions so far."""

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append one chunk ``[B, H, T, .]`` and return everything cached."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@dataclass
class KVCache:
    """Generation cache of a whole model: one :class:`LayerKVCache` per block and the cached length."""

    layers: list[LayerKVCache] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return self.layers[0].length if self.layers else 0
