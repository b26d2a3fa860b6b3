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
slows learning. :func:`train` is one probe run, :func:`train_group` several side by side on one GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .progress import LiveProgress
from .runtime import device_name

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
    """``(x, y)`` of shape ``[batch, seq_len]``: inputs, and next-token targets (``IGNORE`` except after queries).
    Made on ``generator``'s device (a CUDA generator keeps the probe's data off the host)."""
    L, n, dev = spec.seq_len, spec.n_kv, generator.device
    keys = torch.argsort(torch.rand(batch, spec.n_keys, generator=generator, device=dev), dim=1)[:, :n] + 1
    values = torch.randint(0, spec.n_values, (batch, n), generator=generator, device=dev) + 1 + spec.n_keys
    x = torch.zeros(batch, L, dtype=torch.long, device=dev)
    x[:, 0:2 * n:2], x[:, 1:2 * n:2] = keys, values
    y = torch.full((batch, L), IGNORE, dtype=torch.long, device=dev)
    # query slots: distinct positions in the tail [2n, L-1) (the last position has no next token to predict)
    tail = L - 1 - 2 * n
    slots = torch.argsort(torch.rand(batch, tail, generator=generator, device=dev), dim=1)[:, :spec.n_queries] + 2 * n
    which = torch.randint(0, n, (batch, spec.n_queries), generator=generator, device=dev)
    rows = torch.arange(batch, device=dev).unsqueeze(1)
    x[rows, slots] = keys.gather(1, which)
    y[rows, slots] = values.gather(1, which)  # predicted at the query position: the next token is its value
    x[rows, slots + 1] = torch.where(x[rows, slots + 1] == 0, values.gather(1, which), x[rows, slots + 1])
    return x, y


def query_positions(y: Tensor, n_queries: int) -> Tensor:
    """``[B, n_queries]``: the positions of ``y``'s targets, increasing along each row (every row has exactly
    ``n_queries``). The static-shape form of ``y != IGNORE``: indexing with that mask makes the host wait for the
    GPU on every step, and its shape cannot be captured in a CUDA graph."""
    return torch.sort((y != IGNORE).to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n_queries]


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


def arm_attention(arm: str) -> str | dict[str, Any]:
    """The attention of an arm: a preset name (``"ra_disc"``), or a preset with one of its arguments changed
    (``"ra_disc:rank=7"``; the value is read as an int, a float, or else a string), which separates one design
    choice of a preset from the rest (e.g. the bias channel's rank from its form)."""
    preset, sep, override = arm.partition(":")
    if not sep:
        return arm
    key, eq, raw = override.partition("=")
    if not (preset and key.isidentifier() and eq and raw):
        raise ValueError(f"arm must be PRESET or PRESET:key=value (e.g. ra_disc:rank=7); got {arm!r}")
    value: Any = raw
    for cast in (int, float):
        try:
            value = cast(raw)
            break
        except ValueError:
            pass
    return {"preset": preset, key: value}


def probe_config(arm: str, d_model: int, spec: MQARSpec, n_layer: int = 2, head_dim: int = 32,
                 tie_embeddings: bool = False) -> Any:
    """The probe's :class:`~reciprocal_attention.model.GPTConfig`: PyTorch init, untied head with a bias (or, with
    ``tie_embeddings``, the head tied to the N(0, 1) embedding and no bias)."""
    from ..model import GPTConfig

    if d_model % head_dim:
        raise ValueError(f"d_model must be a multiple of head_dim={head_dim}; got {d_model}")
    return GPTConfig(n_layer=n_layer, n_head=d_model // head_dim, n_embd=d_model, block_size=spec.seq_len,
                     vocab_size=spec.vocab_size, dropout=0.0, bias=True, attn=arm_attention(arm), ra_layers="all",
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


def query_logits(model: torch.nn.Module, x: Tensor, pos: Tensor) -> Tensor:
    """``[B * n_queries, vocab]`` logits at the positions ``pos [B, n_queries]`` of ``x``, row by row: the model's
    own forward, with the output layer applied only where a target is (with an 8k vocabulary it would otherwise
    dominate the step)."""
    def at_queries(_mod: torch.nn.Module, args: tuple) -> tuple[Tensor]:
        h = args[0]
        return (h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1])).flatten(0, 1),)

    hook = model.lm_head.register_forward_pre_hook(at_queries)
    try:
        logits, _ = model(x)
    finally:
        hook.remove()
    return logits


def query_loss(model: torch.nn.Module, x: Tensor, y: Tensor, n_queries: int) -> Tensor:
    """Cross-entropy of the model's predictions at the query positions of ``(x, y)``."""
    pos = query_positions(y, n_queries)
    return torch.nn.functional.cross_entropy(query_logits(model, x, pos).float(), y.gather(1, pos).flatten())


def held_out_accuracy(model: torch.nn.Module, spec: MQARSpec, n_sequences: int, device: torch.device) -> float:
    """Accuracy on a fixed held-out set (the same for every arm and seed of a task, made on the CPU)."""
    from ..fold_cache import FoldedProjection

    for m in model.modules():  # replays update parameters without bumping versions (model.eval() drops it too)
        if isinstance(m, FoldedProjection):
            m.invalidate_cache()
    gen = torch.Generator().manual_seed(99_999)
    was_training = model.training
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for start in range(0, n_sequences, 128):
            x, y = make_batch(spec, min(128, n_sequences - start), gen)
            pos = query_positions(y, spec.n_queries)
            logits = query_logits(model, x.to(device), pos.to(device))
            hits += int((logits.argmax(-1).cpu() == y.gather(1, pos).flatten()).sum())
            total += pos.numel()
    model.train(was_training)
    return hits / total


def _lr_at(step: int, run: MQARRun) -> float:
    """Linear warm-up over 10% of the steps (at most 200), then cosine decay to 10% of the peak."""
    warm = max(1, min(200, run.steps // 10))
    if step < warm:
        return run.lr * (step + 1) / warm
    t = (step - warm) / max(1, run.steps - warm)
    return run.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


class TrainStep:
    """One optimizer step of the probe on a batch ``(x, y)``: eager, or with ``graphs`` (CUDA) eager for the first
    :attr:`WARMUP` steps (on a side stream: lazy initialisation, autotuning) and then replayed from one CUDA graph
    of forward, loss, backward and AdamW. A 2-layer probe's eager step is bound by kernel launches (about 14 ms of
    host time per step on an H100 machine for ~1 ms of GPU work); the replay is one launch. The optimizer must be
    ``capturable`` with a tensor learning rate (:func:`make_optimizer`). A failed capture is logged and the run
    goes on eagerly."""

    WARMUP = 3

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, n_queries: int, graphs: bool) -> None:
        self.model, self.opt, self.n_queries = model, opt, n_queries
        self.graphs = graphs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream = torch.cuda.Stream() if graphs else None
        self.steps = 0

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> Tensor:
        """Train on ``(x, y)`` at learning rate ``lr``; returns the loss (a tensor: reading it syncs)."""
        for g in self.opt.param_groups:
            if isinstance(g["lr"], Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        self.steps += 1
        if self.graphs and self.graph is None and self.steps > self.WARMUP:
            self._capture(x, y)
        if self.graph is not None:
            self.x.copy_(x)
            self.y.copy_(y)
            self.graph.replay()
            return self.loss
        if self.stream is None:
            return self._eager(x, y)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            loss = self._eager(x, y)
        torch.cuda.current_stream().wait_stream(self.stream)
        return loss

    def _eager(self, x: Tensor, y: Tensor) -> Tensor:
        loss = query_loss(self.model, x, y, self.n_queries)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()  # holding the graph would keep its gradient nodes on the warm-up stream alive

    def _capture(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x.clone(), y.clone()
        self.opt.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients on every replay
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.loss = query_loss(self.model, self.x, self.y, self.n_queries)
                self.loss.backward()
                self.opt.step()
        except RuntimeError as e:
            log.warning("mqar: CUDA-graph capture of the training step failed (%s); continuing with eager steps", e)
            self.graphs = False
            self.opt.zero_grad(set_to_none=True)
            return
        self.graph = graph


def make_optimizer(model: torch.nn.Module, run: MQARRun, graphs: bool) -> torch.optim.Optimizer:
    """AdamW over the probe; ``capturable`` with its learning rate in a device tensor for a CUDA-graph step."""
    dev = next(model.parameters()).device
    lr: float | Tensor = torch.tensor(run.lr, device=dev) if graphs else run.lr
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=run.weight_decay, capturable=graphs)


class _Probe:
    """One run in training: its model and step, its data generator, its stream (CUDA), its curve and step count."""

    def __init__(self, run: MQARRun, device: torch.device, graphs: bool) -> None:
        from ..model import GPT

        self.run, self.spec, self.device = run, run.spec(), device
        self.model = GPT(probe_config(run.arm, run.d_model, self.spec, run.n_layer,
                                      tie_embeddings=run.tie_embeddings), seed=run.seed).to(device)
        self.step_fn = TrainStep(self.model, make_optimizer(self.model, run, graphs), self.spec.n_queries, graphs)
        self.gen = torch.Generator(device=device).manual_seed(10_000 + run.seed)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device))  # the model's weights are written there
        self.curve: list[tuple[int, float]] = []
        self.step, self.loss, self.loss_v, self.done, self.seconds = 0, None, float("nan"), False, 0.0

    def _on_stream(self) -> Any:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def advance(self) -> None:
        """One training step (queued on the run's stream)."""
        with self._on_stream():
            self.loss = self.step_fn(*make_batch(self.spec, self.run.batch_size, self.gen),
                                     _lr_at(self.step, self.run))
        self.step += 1

    def evaluate_if_due(self) -> None:
        """At an evaluation step: the held-out accuracy into the curve; ``done`` at a non-finite loss, at
        ``stop_at`` accuracy or at the last step."""
        run = self.run
        if self.step % run.eval_every and self.step != run.steps:
            return
        with self._on_stream():
            self.loss_v = float(self.loss.detach())
            if not math.isfinite(self.loss_v):
                log.warning("mqar %s: loss is %s at step %d; stopping this run", run.key, self.loss_v, self.step)
                self.done = True
                return
            self.curve.append((self.step, held_out_accuracy(self.model, self.spec, run.eval_sequences,
                                                            self.device)))
        self.done = self.curve[-1][1] >= run.stop_at or self.step == run.steps

    def record(self, group: int) -> dict[str, Any]:
        """The run's record (its held-out accuracy after its last step)."""
        if not self.curve or self.curve[-1][0] != self.step:
            with self._on_stream():
                acc = held_out_accuracy(self.model, self.spec, self.run.eval_sequences, self.device)
        else:
            acc = self.curve[-1][1]
        return {**asdict(self.run), "accuracy": acc, "steps_run": self.step, "final_train_loss": self.loss_v,
                "curve": self.curve, "seconds": self.seconds, "steps_per_s": self.step / self.seconds,
                "group": group, "cuda_graph": self.step_fn.graph is not None,
                "device": device_name(self.device)}


def train_group(runs: list[MQARRun], device: torch.device | str = "cpu", progress: bool = True,
                graphs: bool | None = None) -> list[dict[str, Any]]:
    """Train several probe runs in one process, step by step in turn, each on its own CUDA stream: the kernels of
    a 2-layer probe are too small to fill the GPU, and runs in separate processes only take turns on it, while
    streams of one process run at once. Each run's numbers are those it gets alone (its own model, optimizer,
    data generator and evaluations); ``seconds`` is the wall time until it stopped, with the others beside it
    (``group`` in its record). Returns the records in the order of ``runs``.

    ``graphs`` (default: on CUDA) replays each step from a CUDA graph (:class:`TrainStep`). Training batches are
    made on ``device`` from a generator seeded by the run's seed (paired across arms on one device)."""
    device = torch.device(device)
    graphs = device.type == "cuda" if graphs is None else graphs
    if graphs and device.type != "cuda":
        raise ValueError(f"graphs=True needs a CUDA device; got {device}")
    if not runs:
        raise ValueError("runs must name at least one MQARRun")
    probes = [_Probe(r, device, graphs) for r in runs]
    name = runs[0].key if len(runs) == 1 else f"{len(runs)} runs"
    bar = LiveProgress(sum(r.steps for r in runs), f"mqar {name}", enabled=progress)
    t0 = time.time()
    while active := [p for p in probes if not p.done]:
        for p in active:
            p.advance()
        for p in active:
            p.evaluate_if_due()
            if p.done:
                p.seconds = time.time() - t0
        one = probes[0] if len(probes) == 1 and probes[0].curve and probes[0].curve[-1][0] == probes[0].step \
            else None  # a single run shows its loss and accuracy at each evaluation
        bar.update(sum(p.step for p in probes), **({"loss": one.loss_v, "acc": one.curve[-1][1]} if one else {}))
    bar.close()
    return [p.record(len(runs)) for p in probes]


def train(run: MQARRun, device: torch.device | str = "cpu", progress: bool = True,
          graphs: bool | None = None) -> dict[str, Any]:
    """Train the probe model on ``run``'s task alone; returns the run's record with its held-out accuracy."""
    return train_group([run], device, progress, graphs)[0]
