"""Multi-query associative recall (MQAR): a synthetic second lens on attention quality.

Each sequence starts with ``n_kv`` key-value pairs ``k_1 v_1 ... k_n v_n`` (distinct keys), followed by a query
section in which keys from those pairs reappear at random positions among filler tokens. After each query key the
model must emit that key's value. Loss and accuracy count only those positions. Keys, values and the filler token
come from disjoint vocabulary ranges: ``0`` is the filler, keys are ``1..n_keys``, values follow.
(After Arora et al., "Zoology", 2023.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE = -100


@dataclass(frozen=True)
class MQARSpec:
    """Task shape: sequence length, pairs per sequence, queries per sequence, key and value vocabulary sizes."""

    seq_len: int = 128
    n_kv: int = 16
    n_queries: int = 16
    n_keys: int = 128
    n_values: int = 128

    def __post_init__(self) -> None:
        if self.n_kv < 1 or self.n_queries < 1:
            raise ValueError(f"n_kv and n_queries must be >= 1; got {self.n_kv}, {self.n_queries}")
        if self.n_kv > self.n_keys:
            raise ValueError(f"n_kv ({self.n_kv}) must be <= n_keys ({self.n_keys}): keys in a sequence are distinct")
        if 2 * self.n_kv + self.n_queries > self.seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= 2*n_kv + n_queries = "
                             f"{2 * self.n_kv + self.n_queries}")

    @property
    def vocab_size(self) -> int:
        """Filler + keys + values."""
        return 1 + self.n_keys + self.n_values


def make_batch(spec: MQARSpec, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of shape ``[batch, seq_len]``: inputs, and next-token targets (``IGNORE`` except after queries)."""
    L, n = spec.seq_len, spec.n_kv
    keys = torch.argsort(torch.rand(batch, spec.n_keys, generator=generator), dim=1)[:, :n] + 1
    values = torch.randint(0, spec.n_values, (batch, n), generator=generator) + 1 + spec.n_keys
    x = torch.zeros(batch, L, dtype=torch.long)
    x[:, 0:2 * n:2], x[:, 1:2 * n:2] = keys, values
    y = torch.full((batch, L), IGNORE, dtype=torch.long)
    # query slots: distinct positions in the tail [2n, L-1) (the last position has no next token to predict)
    tail = L - 1 - 2 * n
    slots = torch.argsort(torch.rand(batch, tail, generator=generator), dim=1)[:, :spec.n_queries] + 2 * n
    which = torch.randint(0, n, (batch, spec.n_queries), generator=generator)
    rows = torch.arange(batch).unsqueeze(1)
    x[rows, slots] = keys.gather(1, which)
    y[rows, slots] = values.gather(1, which)  # predicted at the query position: the next token is its value
    x[rows, slots + 1] = torch.where(x[rows, slots + 1] == 0, values.gather(1, which), x[rows, slots + 1])
    return x, y


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of query positions whose argmax prediction is the right value."""
    mask = y != IGNORE
    if not mask.any():
        raise ValueError("y has no query positions (all targets are IGNORE)")
    return (logits.argmax(-1)[mask] == y[mask]).float().mean().item()
