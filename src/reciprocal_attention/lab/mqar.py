"""Multi-query associative recall (MQAR): a synthetic second lens on attention quality.

Each sequence starts with ``n_kv`` key-value pairs ``k_1 v_1 ... k_n v_n`` (distinct keys), followed by a query
section in which keys from those pairs reappear at random positions among filler tokens. After each query key the
model must emit that key's value. Loss and accuracy count only those positions. Keys, values and the filler token
come from disjoint vocabulary ranges: ``0`` is the filler, keys are ``1..n_keys``, values follow.
(After Arora et al., "Zoology", 2023.)

The probe model (:func:`probe_config`) is a 2-layer GPT with PyTorch's default initialisation, an untied output
layer with a bias and N(0, 1) embeddings. With GPT-2's initialisation (every weight N(0, 0.02), tied head) the same
model stays on the "most frequent value" shortcut (accuracy ~0.33 with 4 pairs). Both scales matter (CPU, 4 pairs,
seq 32, width 128, 500 steps): N(0, 1) embeddings with GPT-2's 0.02 weights stall, so do PyTorch-scale weights with
N(0, 0.02) embeddings, and GPT-2's init with both raised (N(0, 1) embeddings, every weight N(0, 0.05)) learns; the
output bias makes no difference, lr 3e-3 does not rescue GPT-2's init, and tying the head to N(0, 1) embeddings
slows learning. :func:`train` is one probe run.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

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


def zoology_spec(seq_len: int, n_kv: int, vocab_size: int = 8192) -> MQARSpec:
    """The Zoology-style task: ``n_kv`` pairs, as many queries, keys and values each half of ``vocab_size``."""
    half = (vocab_size - 1) // 2
    return MQARSpec(seq_len=seq_len, n_kv=n_kv, n_queries=n_kv, n_keys=half, n_values=half)


def probe_config(arm: str, d_model: int, spec: MQARSpec, n_layer: int = 2, head_dim: int = 32,
                 tie_embeddings: bool = False) -> Any:
    """The probe's :class:`~reciprocal_attention.model.GPTConfig`: PyTorch init, untied head with a bias (or, with
    ``tie_embeddings``, the head tied to the N(0, 1) embedding and no bias)."""
    from ..model import GPTConfig

    if d_model % head_dim:
        raise ValueError(f"d_model must be a multiple of head_dim={head_dim}; got {d_model}")
    return GPTConfig(n_layer=n_layer, n_head=d_model // head_dim, n_embd=d_model, block_size=spec.seq_len,
                     vocab_size=spec.vocab_size, dropout=0.0, bias=True, attn=arm, ra_layers="all",
                     init="torch", tie_embeddings=tie_embeddings, head_bias=not tie_embeddings)


@dataclass(frozen=True)
class MQARRun:
    """One probe run: arm, seed, model width, task shape, learning rate and step budget.

    Seed ``s`` fixes the shared-weight init and the training data order (paired across arms and learning rates);
    the held-out set depends only on the task. Training stops early once held-out accuracy reaches ``stop_at``.
    """

    arm: str
    seed: int
    d_model: int
    seq_len: int
    n_kv: int
    lr: float
    steps: int
    vocab_size: int = 8192
    batch_size: int = 64
    n_layer: int = 2
    eval_every: int = 250
    eval_sequences: int = 512
    stop_at: float = 0.99
    weight_decay: float = 0.0
    tie_embeddings: bool = False

    @property
    def key(self) -> str:
        """A file-name-safe identifier of the run."""
        return (f"{self.arm}-d{self.d_model}-T{self.seq_len}-kv{self.n_kv}-V{self.vocab_size}-lr{self.lr:g}"
                f"-n{self.steps}{'-tied' if self.tie_embeddings else ''}-s{self.seed}")

    def spec(self) -> MQARSpec:
        """The task of this run."""
        return zoology_spec(self.seq_len, self.n_kv, self.vocab_size)


class LiveProgress:
    """Live progress of a loop: a tqdm bar on a terminal, else one line every ``interval`` seconds."""

    def __init__(self, total: int, desc: str, interval: float = 30.0, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total, self.desc, self.interval, self.enabled = total, desc, interval, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True) if self.tty else None
        self.t0 = self.last = time.time()
        self.n = 0
        self.stats: dict[str, float] = {}

    def update(self, n: int, **stats: float) -> None:
        """Advance to position ``n`` (cheap: call it every step); ``stats`` (e.g. loss) are shown until replaced."""
        if not self.enabled:
            return
        self.stats.update(stats)
        text = " ".join(f"{k} {v:.4g}" for k, v in self.stats.items())
        if self.bar is not None:
            if stats:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n - self.n)
        elif time.time() - self.last >= self.interval or n >= self.total:
            el = time.time() - self.t0
            eta = el / max(n, 1) * (self.total - n)
            print(f"[{self.desc}] {n}/{self.total} {text} elapsed {el:.0f}s eta {eta:.0f}s", flush=True)
            self.last = time.time()
        self.n = n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def query_logits(model: torch.nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """``[N, vocab]`` logits at the ``N`` query positions ``mask`` of ``x``: the model's own forward, with the
    output layer applied only where a target is (with an 8k vocabulary it would otherwise dominate the step)."""
    hook = model.lm_head.register_forward_pre_hook(lambda _mod, args: (args[0][mask],))
    try:
        logits, _ = model(x)
    finally:
        hook.remove()
    return logits


def held_out_accuracy(model: torch.nn.Module, spec: MQARSpec, n_sequences: int, device: torch.device) -> float:
    """Accuracy on a fixed held-out set (the same for every arm and seed of a task)."""
    gen = torch.Generator().manual_seed(99_999)
    was_training = model.training
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for start in range(0, n_sequences, 128):
            x, y = make_batch(spec, min(128, n_sequences - start), gen)
            mask = y != IGNORE
            logits = query_logits(model, x.to(device), mask.to(device))
            hits += int((logits.argmax(-1).cpu() == y[mask]).sum())
            total += int(mask.sum())
    model.train(was_training)
    return hits / total


def _lr_at(step: int, run: MQARRun) -> float:
    """Linear warm-up over 10% of the steps (at most 200), then cosine decay to 10% of the peak."""
    warm = max(1, min(200, run.steps // 10))
    if step < warm:
        return run.lr * (step + 1) / warm
    t = (step - warm) / max(1, run.steps - warm)
    return run.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(run: MQARRun, device: torch.device | str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Train the probe model on ``run``'s task; returns the run's record with its held-out accuracy."""
    from ..model import GPT

    device = torch.device(device)
    spec = run.spec()
    model = GPT(probe_config(run.arm, run.d_model, spec, run.n_layer, tie_embeddings=run.tie_embeddings),
                seed=run.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
    gen = torch.Generator().manual_seed(10_000 + run.seed)
    bar = LiveProgress(run.steps, f"mqar {run.key}", enabled=progress)
    curve: list[tuple[int, float]] = []
    t0, step, loss_v = time.time(), 0, float("nan")
    for step in range(1, run.steps + 1):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step - 1, run)
        x, y = make_batch(spec, run.batch_size, gen)
        mask = y != IGNORE
        logits = query_logits(model, x.to(device, non_blocking=True), mask.to(device, non_blocking=True))
        loss = torch.nn.functional.cross_entropy(logits.float(), y[mask].to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(step)
        if step % run.eval_every == 0 or step == run.steps:
            loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                log.warning("mqar %s: loss is %s at step %d; stopping this run", run.key, loss_v, step)
                break
            curve.append((step, held_out_accuracy(model, spec, run.eval_sequences, device)))
            bar.update(step, loss=loss_v, acc=curve[-1][1])
            if curve[-1][1] >= run.stop_at:
                break
    bar.close()
    seconds = time.time() - t0
    acc = held_out_accuracy(model, spec, run.eval_sequences, device) if not curve or curve[-1][0] != step \
        else curve[-1][1]
    return {**asdict(run), "accuracy": acc, "steps_run": step, "final_train_loss": loss_v, "curve": curve,
            "seconds": seconds, "steps_per_s": step / seconds,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
