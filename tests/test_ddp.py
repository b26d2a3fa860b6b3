"""DDP on CPU (gloo), issue 7: two processes give the gradients of one process over the same global batch.

Each rank builds the same tiny RA GPT (seed-deterministic init), takes its half of a fixed global batch and runs
the trainer's own step code, :func:`reciprocal_attention.train.accumulate_gradients`, under
``DistributedDataParallel`` -- with one micro-batch, and with two (the first in ``no_sync()``). The averaged
gradients must equal those of a single process computing the mean loss over the whole global batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reciprocal_attention.model import GPT, GPTConfig
from reciprocal_attention.train import accumulate_gradients

WORLD = 2
GLOBAL_B, T, VOCAB = 8, 16, 64
CFG = dict(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=VOCAB, attn="ra", ra_layers="all")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, VOCAB, (GLOBAL_B, T + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def make_model() -> GPT:
    return GPT(GPTConfig(**CFG), seed=0).float().train()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        x, y = global_batch()
        half = GLOBAL_B // WORLD
        x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # CPU: no device_ids, as train.py does
        results = {}
        # one micro-batch per step
        loss1 = accumulate_gradients(ddp, [(x, y)])
        results["accum1"] = grads(model)
        model.zero_grad(set_to_none=True)
        # two micro-batches: no_sync() on the first, all-reduce on the second
        q = half // 2
        loss2 = accumulate_gradients(ddp, [(x[:q], y[:q]), (x[q:], y[q:])])
        results["accum2"] = grads(model)
        results["loss"] = torch.stack([loss1, loss2])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        x, y = global_batch()
        _, loss = model(x, y)  # mean over the whole global batch
        loss.backward()
        ref = grads(model)
    finally:
        torch.set_num_threads(n)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert len(ref) == len(dict(model.named_parameters()))  # every parameter got a gradient (RA ones included)
    assert any(".W_recip" in name for name in ref) and any(".w_rec" in name for name in ref)
    for key in ("accum1", "accum2"):
        for r, res in enumerate(ranks):
            got = res[key]
            assert sorted(got) == sorted(ref), key
            worst = max(_rel(got[name], ref[name]) for name in ref)
            assert worst <= 1e-6, f"{key} rank {r}: worst relative gradient error {worst:.3g}"
            # atol for tensors whose gradient is ~0
            for name in ref:
                torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=f"{key} {name}")
    # DDP averages gradients, not losses: each rank's loss is its own shard's; the mean is the global loss.
    mean_loss = torch.stack([res["loss"] for res in ranks]).mean(0)
    torch.testing.assert_close(mean_loss, torch.stack([loss.detach()] * 2), rtol=1e-6, atol=1e-6)
