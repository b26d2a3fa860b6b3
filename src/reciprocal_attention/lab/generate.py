"""``ra generate``: sample text from a trained model, streamed token by token.

    ra generate runs/tiny --prompt "To be, or not" --max-new-tokens 200 --temperature 0.8 --top-k 40
    echo "Once upon a time" | ra generate runs/gpt2-ra/checkpoints/step_000500 --top-p 0.9 --num-samples 3
    ra generate ckpt/ra-gpt2 --temperature 0                  # a saved / converted Hugging Face GPT-2: greedy

``SOURCE`` is a run directory, a checkpoints directory or one step directory of ``ra train`` (its latest
checkpoint is used), or a Hugging Face ``save_pretrained`` directory (plain GPT-2 or converted with
``reciprocal_attention.hf``). Both decode with a KV cache; once a sequence outgrows the model's context
(``block_size`` / ``n_positions``) each step re-encodes the last context-length tokens instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checkpoint as ckpt
from .config import TrainConfig
from .errors import UserError
from .tokenizer import BYTE_EOT, BYTE_N_VOCAB, GPT2_EOT, GPT2_N_VOCAB, get_tokenizer

log = logging.getLogger(__name__)
TOKENIZER_CHOICES = ("auto", "byte", "gpt2")
_VOCAB_TOKENIZER = {BYTE_N_VOCAB: "byte", GPT2_N_VOCAB: "gpt2"}
_EOT = {"byte": BYTE_EOT, "gpt2": GPT2_EOT}


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------

def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise :class:`UserError` naming the parameter unless ``temperature >= 0``, ``top_k >= 1``, ``0 < top_p <= 1``."""
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise UserError(f"--temperature must be a number >= 0 (0 = greedy); got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"--top-k must be an integer >= 1; got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1]; got {top_p!r}")


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """The next token ``[B, 1]`` from last-position ``logits [B, V]``.

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by ``temperature``, cut to the
    ``top_k`` most likely tokens, then to the smallest set whose probability reaches ``top_p`` (nucleus; the most
    likely token always stays), and one token is drawn with ``generator``.
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# Models: the project's GPT or a Hugging Face GPT-2, behind one "next logits" step
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready to decode: ``kind`` is ``"gpt"`` or ``"hf"``, ``context`` its maximum sequence length."""

    model: torch.nn.Module
    kind: str
    context: int
    vocab_size: int
    source: Path
    tokenizer_files: bool = False  # an HF directory that ships its own tokenizer


def _load_run(path: Path, device: torch.device) -> LoadedModel:
    from safetensors import safe_open

    from ..model import GPT

    state = ckpt.read_state(path)
    d = Path(state["dir"])
    cfg = TrainConfig.from_dict(state["config"])
    with safe_open(str(d / ckpt.MODEL_FILE), framework="pt") as f:
        vocab = f.get_slice("transformer.wte.weight").get_shape()[0]
    gpt = GPT(cfg.model.gpt_config(vocab), seed=cfg.system.seed)
    ckpt.load_model(d / ckpt.MODEL_FILE, gpt)
    log.info("loaded %s (step %s)", d, state.get("step"))
    return LoadedModel(gpt.to(device).eval(), "gpt", gpt.config.block_size, vocab, d)


def _load_hf(path: Path, device: torch.device) -> LoadedModel:
    try:
        from .. import hf
    except ImportError as e:
        raise UserError(f"{path} is a Hugging Face checkpoint: {e}") from None
    try:
        model = hf.load_pretrained(path, device=device)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None
    has_tok = any((path / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
    c = model.config
    return LoadedModel(model, "hf", c.n_positions, c.vocab_size, path, has_tok)


def load_source(source: str | Path, device: torch.device) -> LoadedModel:
    """The model in ``source``: a Hugging Face directory (``config.json``) or an ``ra train`` run/checkpoint."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"SOURCE {path} does not exist (expected an ra train run/checkpoint directory or a Hugging "
                        f"Face save_pretrained directory)")
    if (path / "config.json").is_file():
        return _load_hf(path, device)
    return _load_run(path, device)


class Stepper:
    """Next-token logits of a growing sequence, with the model's KV cache while it fits the context."""

    def __init__(self, loaded: LoadedModel, use_cache: bool = True) -> None:
        self.loaded, self.use_cache = loaded, use_cache
        self.cache: Any = None
        self.fed = 0  # tokens of the sequence the cache holds

    def __call__(self, idx: Tensor) -> Tensor:
        """``idx [B, T]`` (the whole sequence so far) -> logits ``[B, V]`` for position ``T``."""
        m, ctx = self.loaded.model, self.loaded.context
        cached = self.use_cache and idx.size(1) <= ctx
        if self.loaded.kind == "gpt":
            from ..cache import KVCache

            if cached:
                self.cache = self.cache if self.cache is not None else KVCache()
                logits, _ = m(idx[:, self.fed:], cache=self.cache)
            else:
                logits, _ = m(idx[:, -ctx:])
        elif cached:
            out = m(idx[:, self.fed:], cache=self.cache, use_cache=True)  # transformers 5.x keyword
            self.cache, logits = out.cache, out.logits
        else:
            logits = m(idx[:, -ctx:], use_cache=False).logits
        self.fed = idx.size(1)
        return logits[:, -1, :]


@torch.no_grad()
def generate_ids(loaded: LoadedModel, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, on_token: Callable[[int], None] | None = None) -> list[int]:
    """``prompt`` plus ``max_new_tokens`` sampled token ids; ``on_token`` is called with each one as it comes."""
    check_sampling(temperature, top_k, top_p)
    if not prompt:
        raise UserError("the prompt encodes to no tokens; give --prompt text")
    device = next(loaded.model.parameters()).device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    step = Stepper(loaded, use_cache)
    for _ in range(max_new_tokens):
        nxt = sample_next(step(idx), temperature, top_k, top_p, generator)
        idx = torch.cat([idx, nxt], dim=1)
        if on_token is not None:
            on_token(int(nxt))
    return idx[0].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------

def pick_tokenizer(loaded: LoadedModel, name: str = "auto") -> Any:
    """The tokenizer for ``loaded``: ``name`` (``byte``/``gpt2``), or by vocabulary size, or the HF directory's."""
    if name not in TOKENIZER_CHOICES:
        raise UserError(f"--tokenizer must be one of {', '.join(TOKENIZER_CHOICES)}; got {name!r}")
    if name == "auto":
        if loaded.tokenizer_files:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(loaded.source), local_files_only=True)
        name = _VOCAB_TOKENIZER.get(loaded.vocab_size)
        if name is None:
            raise UserError(f"{loaded.source}: vocabulary of {loaded.vocab_size} tokens matches no known tokenizer "
                            f"(byte: {BYTE_N_VOCAB}, gpt2: {GPT2_N_VOCAB}) and the directory ships none")
    want = BYTE_N_VOCAB if name == "byte" else GPT2_N_VOCAB
    if loaded.vocab_size < want:
        raise UserError(f"--tokenizer {name} has {want} tokens, more than the model's {loaded.vocab_size}")
    return get_tokenizer(name)


class TextStream:
    """Writes the decoded text of a growing token list, only what is new, flushing after each token.

    Decoding the whole continuation each time (rather than token by token) keeps multi-byte characters whole; a
    trailing U+FFFD (an incomplete character) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def close(self) -> str:
        """Write whatever is held back; returns the whole continuation."""
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()
        return text


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; :class:`UserError` otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def _document_start(tok: Any, loaded: LoadedModel, tokenizer: str) -> list[int]:
    """The end-of-text token that starts a new document, for an empty prompt."""
    eot = getattr(tok, "eos_token_id", None)  # a Hugging Face tokenizer
    if eot is None:
        eot = _EOT.get(tokenizer if tokenizer != "auto" else _VOCAB_TOKENIZER.get(loaded.vocab_size, ""))
    if eot is None:
        raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from; give --prompt")
    return [int(eot)]


def generate_text(source: str | Path, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, num_samples: int = 1,
                  device: str = "auto", tokenizer: str = "auto", use_cache: bool = True,
                  out: TextIO | None = None) -> list[str]:
    """Load ``source``, write ``num_samples`` continuations of ``prompt`` to ``out`` as they are sampled (each
    after the prompt), and return the continuations. One generator seeded with ``seed`` drives every sample."""
    check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be an integer >= 0; got {max_new_tokens!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"--num-samples must be an integer >= 1; got {num_samples!r}")
    dev = pick_device(device)
    loaded = load_source(source, dev)
    tok = pick_tokenizer(loaded, tokenizer)
    ids = list(tok.encode(prompt)) or _document_start(tok, loaded, tokenizer)
    out = sys.stdout if out is None else out
    generator = torch.Generator(dev).manual_seed(int(seed))
    texts = []
    for i in range(num_samples):
        if num_samples > 1:
            out.write(f"--- sample {i + 1}/{num_samples} ---\n")
        out.write(prompt)
        out.flush()
        stream = TextStream(tok, out)
        generate_ids(loaded, ids, max_new_tokens, temperature, top_k, top_p, generator, use_cache, stream)
        texts.append(stream.close())
    return texts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ra generate", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE",
                   help="an ra train run directory, checkpoints directory or step directory (latest checkpoint), or "
                        "a Hugging Face save_pretrained directory (plain or converted GPT-2)")
    p.add_argument("--prompt", default=None,
                   help="text to continue (default: read standard input when it is not a terminal, else start a "
                        "new document)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample per sample (default 100)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature, >= 0; 0 is greedy decoding (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens (K >= 1)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: only the most likely tokens whose probability sums to P, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler (default 0): same seed, same text")
    p.add_argument("--num-samples", type=int, default=1, help="independent continuations to write (default 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--tokenizer", default="auto", choices=TOKENIZER_CHOICES,
                   help="auto: the HF directory's own tokenizer, else byte for a 257-token vocabulary and gpt2 "
                        "(BPE) for 50257 (default auto)")
    p.add_argument("--no-cache", action="store_true",
                   help="re-encode the whole sequence every step instead of using the KV cache (slower; a check)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt
    if prompt is None:
        prompt = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    generate_text(args.source, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                  args.num_samples, args.device, args.tokenizer, not args.no_cache)  # UserError: `ra` prints it
    return 0


if __name__ == "__main__":
    sys.exit(main())
