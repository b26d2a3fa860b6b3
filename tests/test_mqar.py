"""MQAR batches: the value after each query is the one paired with that key earlier in the sequence."""

import pytest
import torch

from reciprocal_attention.lab.mqar import IGNORE, MQARSpec, accuracy, make_batch


def test_targets_are_the_paired_values():
    spec = MQARSpec(seq_len=64, n_kv=8, n_queries=10, n_keys=32, n_values=32)
    x, y = make_batch(spec, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 64)
    for b in range(16):
        pairs = {int(x[b, 2 * i]): int(x[b, 2 * i + 1]) for i in range(8)}
        assert len(pairs) == 8  # distinct keys
        assert all(1 <= k <= 32 for k in pairs) and all(33 <= v <= 64 for v in pairs.values())
        q = (y[b] != IGNORE).nonzero().flatten()
        assert len(q) == 10 and q.min() >= 16
        for pos in q.tolist():
            assert y[b, pos] == pairs[int(x[b, pos])]
    assert int(x.max()) < spec.vocab_size


def test_deterministic_given_generator():
    spec = MQARSpec(seq_len=32, n_kv=4, n_queries=4, n_keys=16, n_values=16)
    a = make_batch(spec, 4, torch.Generator().manual_seed(3))
    b = make_batch(spec, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_accuracy_counts_only_queries():
    y = torch.tensor([[IGNORE, 5, IGNORE, 7]])
    logits = torch.zeros(1, 4, 10)
    logits[0, 1, 5] = 1.0
    logits[0, 3, 2] = 1.0
    assert accuracy(logits, y) == 0.5


@pytest.mark.parametrize("kw,match", [(dict(n_kv=40, n_keys=32), "n_kv"), (dict(seq_len=20), "seq_len"),
                                      (dict(n_queries=0), "n_kv and n_queries")])
def test_spec_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MQARSpec(**kw)
