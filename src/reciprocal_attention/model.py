"""GPT-2 with Reciprocal Attention, in the nanoGPT style.

    cfg = GPTConfig.from_preset("gpt2", attn="ra", ra_layers="middle")
    model = GPT(cfg, seed=0)
    logits, loss = model(idx, targets)
    out = model.generate(idx, max_new_tokens=50, temperature=0.0)   # greedy, with a KV cache

Only the attention differs between arms: every parameter all arms share (embeddings, LayerNorms, MLPs, ``c_attn``,
``c_proj``) is initialised from a generator seeded by ``(seed, parameter name)``, so a standard model and an RA
model built with the same seed start from the same shared weights. RA-only parameters (``W_recip``, gates,
``d_bias``, ``u``, ...) use the attention module's own init recipe, drawn from a generator seeded the same way.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import ReciprocalAttention
from .cache import KVCache, LayerKVCache

log = logging.getLogger(__name__)

# name -> (n_layer, n_head, n_embd, block_size)
GPT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 2, 64, 64),
    "small-cpu": (4, 4, 128, 128),
    "gpt2": (12, 12, 768, 1024),
    "gpt2-medium": (24, 16, 1024, 1024),
    "gpt2-large": (36, 20, 1280, 1024),
    "gpt2-xl": (48, 25, 1600, 1024),
}
# RA parameters that are gates or biases, not weight matrices: never weight-decayed.
NO_DECAY_RA = ("w_std", "w_rec", "w_disc", "d_bias", "u", "out_gate")
#: MLP activations: ``gelu`` is exact-erf ``nn.GELU()`` (nanoGPT); ``gelu_tanh`` is the tanh approximation
#: (``nn.GELU(approximate="tanh")``), GPT-2's ``gelu_new`` / ``gelu_pytorch_tanh``.
ACTIVATIONS = ("gelu", "gelu_tanh")
#: Initialisation schemes. ``gpt2``: every Linear/Embedding weight ~ N(0, 0.02), residual projections
#: (``c_proj``) ~ N(0, 0.02/sqrt(2L)), biases 0. ``torch``: PyTorch's own defaults (Linear weight and bias
#: ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), Embedding ~ N(0, 1)); with GPT-2's init a small GPT stays on MQAR's
#: "most frequent value" shortcut, with PyTorch's it learns the recall (tests/test_mqar.py).
INIT_SCHEMES = ("gpt2", "torch")


@dataclass
class GPTConfig:
    """Shape and attention of the model.

    ``attn``: a :class:`ReciprocalAttention` preset name (``"standard"``, ``"seed"``, ``"ra"``, ``"ra_disc"``,
    ``"full"``, ``"low_rank"``, ``"output_gate"``) or a dict of its kwargs (with an optional ``"preset"`` key
    the rest override). ``ra_layers``: which blocks get it: ``"all"``, ``"none"``, ``"middle"`` (the middle
    third) or a list of indices; the others use ``variant="standard"``. ``bias`` applies to every Linear and
    LayerNorm, attention included, unless ``attn`` sets ``bias`` itself. ``activation``: the MLP's GELU, one of
    :data:`ACTIVATIONS` (``"gelu_tanh"`` matches GPT-2 checkpoints, whose ``activation_function`` is ``gelu_new``).
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True
    attn: str | dict[str, Any] = "standard"
    ra_layers: str | list[int] = "all"
    activation: str = "gelu"
    # Model setup (see INIT_SCHEMES): the defaults are GPT-2's; the MQAR probe uses init="torch", untied, head bias.
    init: str = "gpt2"
    tie_embeddings: bool = True
    head_bias: bool = False

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named size (``tiny``, ``small-cpu``, ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``)."""
        if name not in GPT_PRESETS:
            raise ValueError(f"GPT preset must be one of {list(GPT_PRESETS)}; got {name!r}")
        n_layer, n_head, n_embd, block_size = GPT_PRESETS[name]
        return cls(**{**dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size), **overrides})

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head; got {self.n_embd} and {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if not isinstance(self.attn, (str, dict)):
            raise TypeError(f"attn must be a preset name or a dict of ReciprocalAttention kwargs; got "
                            f"{type(self.attn).__name__}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {self.activation!r}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}; got {self.init!r}")
        for name in ("tie_embeddings", "head_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool; got {getattr(self, name)!r}")
        self.ra_layer_indices()  # validates ra_layers

    def ra_layer_indices(self) -> list[int]:
        """The sorted block indices that use the configured attention."""
        L, sel = self.n_layer, self.ra_layers
        if sel == "all":
            return list(range(L))
        if sel == "none":
            return []
        if sel == "middle":
            return list(range(L // 3, L - L // 3)) if L >= 3 else list(range(L))
        if isinstance(sel, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in sel):
            bad = [i for i in sel if not 0 <= i < L]
            if bad or len(set(sel)) != len(sel):
                raise ValueError(f"ra_layers indices must be distinct and in [0, {L}); got {list(sel)}")
            return sorted(sel)
        raise ValueError(f"ra_layers must be 'all', 'none', 'middle' or a list of layer indices; got {sel!r}")


def param_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from ``(seed, name)``: the same for a parameter name in every arm."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()[:8], "little") >> 1


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(param_seed(seed, name))


def build_attention(cfg: GPTConfig, use_ra: bool) -> ReciprocalAttention:
    """The attention module of one block: the configured one, or standard for blocks not chosen for RA."""
    base = dict(n_embd=cfg.n_embd, n_head=cfg.n_head, block_size=cfg.block_size)
    spec = {"preset": cfg.attn} if isinstance(cfg.attn, str) else dict(cfg.attn)
    clash = sorted(set(spec) & set(base))
    if clash:
        raise ValueError(f"attn must not set {clash}: they come from the model config")
    preset = spec.pop("preset", None)
    # Shared by RA and standard blocks, so the arms differ only in the attention math.
    common = {"bias": spec.pop("bias", cfg.bias), "dropout": spec.pop("dropout", cfg.dropout)}
    if "backend" in spec:
        common["backend"] = spec["backend"]
    if not use_ra:
        return ReciprocalAttention(variant="standard", **base, **common)
    if preset is not None:
        return ReciprocalAttention.from_preset(preset, **base, **{**common, **spec})
    return ReciprocalAttention(**base, **{**common, **spec})


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no ``bias=False`` before 2.1)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class MLP(nn.Module):
    """GPT-2 feed-forward: ``C -> 4C -> GELU -> C`` (exact-erf GELU, or its tanh approximation for ``gelu_tanh``)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: GPTConfig, use_ra: bool) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = build_attention(cfg, use_ra)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: LayerKVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 language model with (optionally) Reciprocal Attention in chosen blocks."""

    def __init__(self, config: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig; got {type(config).__name__}")
        self.config, self.seed = config, int(seed)
        ra = set(config.ra_layer_indices())
        with torch.random.fork_rng(devices=[]):  # construction must not consume the caller's RNG stream
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i in ra) for i in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            ))
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, saved once
        self.init_weights(self.seed)

    # ------------------------------------------------------------------------------------------------------------
    # Init
    # ------------------------------------------------------------------------------------------------------------
    def shared_parameter_names(self) -> list[str]:
        """Names of the parameters every arm has (everything except RA-only attention parameters)."""
        names = []
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if "attn" in parts and parts[parts.index("attn") + 1] not in ("c_attn", "c_proj"):
                continue
            names.append(name)
        return names

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """``config.init`` scheme, each shared parameter from its own ``(seed, name)`` generator (identical across arms).

        LayerNorm weights 1 and biases 0 in every scheme. ``gpt2``: Linear/Embedding weights ~ N(0, 0.02),
        residual projections (``*.c_proj.weight``) ~ N(0, 0.02/sqrt(2L)), biases 0. ``torch``: Linear weights and
        biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), Embeddings ~ N(0, 1). RA-only parameters: the module's own
        recipe with a ``(seed, "<block>.attn")`` generator.
        """
        params = dict(self.named_parameters())
        for name in self.shared_parameter_names():
            p = params[name]
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            else:
                p.copy_(self._init_value(name, p.shape, seed))
        for i, block in enumerate(self.transformer.h):
            block.attn.reset_ra_parameters(generator=_generator(seed, f"transformer.h.{i}.attn"))
            block.attn.invalidate_cache()

    def _init_value(self, name: str, shape: torch.Size, seed: int) -> Tensor:
        """The initial value of a shared Linear/Embedding parameter under ``config.init`` (float32, CPU)."""
        gen = _generator(seed, name)
        if self.config.init == "gpt2":
            if name.endswith(".bias"):
                return torch.zeros(shape)
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
            return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)
        if name.startswith(("transformer.wte.", "transformer.wpe.")):
            return torch.randn(shape, generator=gen, dtype=torch.float32)
        # nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) for the weight is U(-1/sqrt(fan_in), ..), as is the bias
        bound = 1.0 / math.sqrt(self.get_submodule(name.rsplit(".", 1)[0]).in_features)
        return torch.rand(shape, generator=gen, dtype=torch.float32).mul_(2 * bound).sub_(bound)

    # ------------------------------------------------------------------------------------------------------------
    # Forward and generation
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, idx: Tensor, targets: Tensor | None = None,
                cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """``idx [B, T]`` -> ``(logits [B, T, vocab], loss or None)``; ``targets`` uses -1 to ignore a position.

        With ``cache``, ``idx`` continues the cached sequence (its positions start at ``cache.length``).
        """
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be an int64 tensor [B, T]; got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {list(getattr(idx, 'shape', []))}")
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} (cached {start} + new {T}) exceeds block_size "
                             f"{self.config.block_size}")
        if cache is not None and not cache.layers:
            cache.layers = [LayerKVCache() for _ in self.transformer.h]
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache=cache.layers[i] if cache is not None else None)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have the shape of idx {list(idx.shape)}; got {list(targets.shape)}")
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx [B, T]``; ``temperature=0`` is greedy.

        With ``use_cache`` the keys/values of earlier positions are reused. Once the sequence is longer than
        ``block_size`` the context window slides (as without a cache), which shifts every position, so each
        step then re-encodes the last ``block_size`` tokens.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or a positive int; got {top_k!r}")
        bs = self.config.block_size
        cache, fed = None, 0  # fed: how many tokens of idx the cache holds
        warned = False
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= bs:
                if cache is None:
                    cache = KVCache()
                logits, _ = self(idx[:, fed:], cache=cache)
                fed = idx.size(1)
            else:
                if use_cache and not warned:
                    log.info("generate: sequence exceeds block_size=%d; re-encoding the sliding window each step",
                             bs)
                    warned = True
                logits, _ = self(idx[:, -bs:])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx

    # ------------------------------------------------------------------------------------------------------------
    # Accounting and optimizer
    # ------------------------------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); minus the position embeddings when ``non_embedding``."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (PaLM appendix B): ``6 N + 12 L H D T`` with standard attention's count.

        RA variants are counted with the same formula so that every arm's MFU shares one denominator.
        """
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    def estimate_mfu(self, tokens_per_s: float, device_peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved ``tokens_per_s * flops_per_token`` over ``device_peak_flops``."""
        if device_peak_flops <= 0:
            raise ValueError(f"device_peak_flops must be > 0; got {device_peak_flops!r}")
        return tokens_per_s * self.flops_per_token() / device_peak_flops

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: decay for weight matrices, none for biases, norms and RA gates/biases.

        Decayed: every parameter with ``dim >= 2`` (Linear and Embedding weights as in nanoGPT, and ``W_recip``,
        a projection like ``c_attn``'s). Not decayed: 1-D parameters and the RA gates/biases ``w_std``,
        ``w_rec``, ``w_disc``, ``d_bias``, ``u``, ``out_gate`` (some are 2-D, but shrinking a gate or a bias
        toward 0 would bias the comparison against RA).
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.dim() >= 2 and name.split(".")[-1] not in NO_DECAY_RA:
                decay.append(p)
            else:
                no_decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str | None = None, eps: float = 1e-8) -> torch.optim.AdamW:
        """AdamW over :meth:`optimizer_groups`, fused on CUDA."""
        device_type = device_type or self.transformer.wte.weight.device.type
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(self.optimizer_groups(weight_decay), lr=learning_rate, betas=betas, eps=eps,
                                 **extra)

    def describe(self) -> dict[str, Any]:
        """Config, parameter counts and per-layer attention (for logs and run directories)."""
        return {"config": asdict(self.config), "seed": self.seed, "params": self.num_params(False),
                "params_non_embedding": self.num_params(True),
                "attention": [b.attn.extra_repr() for b in self.transformer.h]}
