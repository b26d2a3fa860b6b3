"""Building a corpus: fetch and read every source, clean, split by document, tokenize, write the split files and
the manifest (layout in ``layout``). Also the committed fixture, a ~30 KB corpus for tests and CPU demos."""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import re
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import sha256_file, write_bytes, write_json
from ..tokenizer import TOKENIZERS, Tokenizer, get_tokenizer
from .clean import normalize_text
from .layout import DTYPE, FORMAT, MANIFEST, SPLITS, DataError, Document
from .sources import DEFAULT_SOURCES, READERS, SOURCES, fetch_source

log = logging.getLogger(__name__)

MIN_DOC_CHARS = 200  # shorter documents (e.g. kernel index pages that are only a toctree) are dropped
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_corpus.txt"
# what a damaged or unexpected archive raises while a source is read (the parsers' own errors are ValueError)
ARCHIVE_ERRORS = (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error,
                  lzma.LZMAError)


def split_of(doc_id: str, val_fraction: float, test_fraction: float, salt: str = "ra-corpus-v1") -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a document, from the sha256 of ``salt:doc_id`` (deterministic)."""
    u = int.from_bytes(hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()[:8], "big") / 2.0 ** 64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def _check_tokenizer(tokenizer: str) -> None:
    if tokenizer not in TOKENIZERS:
        raise DataError(f"tokenizer must be one of {TOKENIZERS}; got {tokenizer!r}")


def write_corpus(out_dir: str | os.PathLike, docs: Sequence[Document], splits: Sequence[str], tok: Tokenizer,
                 sources: list[dict], split_info: dict) -> dict:
    """Tokenize ``docs`` (``splits[i]`` is doc i's split), write ``{split}.bin`` and ``manifest.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        if s not in splits:
            raise DataError(f"split {s!r} got no documents; change the fractions or add sources")
    log.info("tokenizing %d documents with %s", len(docs), tok.name)
    token_lists = tok.encode_batch([d.text for d in docs])
    manifest: dict[str, Any] = {
        "format": FORMAT, "tokenizer": {"name": tok.name, "n_vocab": tok.n_vocab, "eot": tok.eot},
        "dtype": "uint16", "eot_placement": "after every document", "split": split_info, "sources": sources,
        "splits": {}, "documents": [],
    }
    for s in SPLITS:
        idx = [i for i, sp in enumerate(splits) if sp == s]
        ids = np.fromiter((t for i in idx for t in (*token_lists[i], tok.eot)), dtype=np.int64)
        if ids.max(initial=0) >= min(tok.n_vocab, 2 ** 16):
            raise ValueError(f"tokenizer {tok.name} produced id {int(ids.max())}, outside its vocabulary "
                             f"{tok.n_vocab} or uint16")
        arr = ids.astype(DTYPE)
        digest = write_bytes(out / f"{s}.bin", memoryview(arr)).sha256
        by_source: dict[str, int] = {}
        for i in idx:
            by_source[docs[i].source] = by_source.get(docs[i].source, 0) + 1
        manifest["splits"][s] = {"file": f"{s}.bin", "tokens": int(arr.size), "bytes": int(arr.nbytes),
                                 "documents": len(idx), "documents_by_source": by_source, "sha256": digest}
    for d, sp, toks in zip(docs, splits, token_lists):
        manifest["documents"].append({"id": d.doc_id, "source": d.source, "split": sp,
                                      "chars": len(d.text), "tokens": len(toks)})
    write_json(out / MANIFEST, manifest, nonfinite="raise", indent=2)
    return manifest


def _read_source(name: str, cache: Path) -> tuple[list[Document], dict]:
    """The cleaned documents of source ``name`` (fetched into ``cache``) and its manifest entry."""
    src = SOURCES[name]
    archive, version = fetch_source(src, cache)
    try:
        got = READERS[name](archive)
    except ARCHIVE_ERRORS as e:  # the cached archive can be downloaded again
        raise DataError(f"source {name}: cannot read {archive} ({e}); delete it to download it again") from e
    cleaned = [Document(d.source, d.doc_id, normalize_text(d.text)) for d in got]
    kept = [d for d in cleaned if len(d.text) >= MIN_DOC_CHARS]
    dropped = len(cleaned) - len(kept)
    chars = sum(len(d.text) for d in kept)
    log.info("%s: %d documents, %d chars (%d shorter than %d chars dropped)", name, len(kept), chars, dropped,
             MIN_DOC_CHARS)
    info = {"name": name, "package": src.package, "kind": src.kind, "version": version, "archive": archive.name,
            "sha256": sha256_file(archive), "documents": len(kept), "dropped_short": dropped, "chars": chars}
    return kept, info


def prepare(out_dir: str | os.PathLike, sources: Sequence[str] = DEFAULT_SOURCES, tokenizer: str = "gpt2",
            val_fraction: float = 0.05, test_fraction: float = 0.05, cache_dir: str | os.PathLike | None = None,
            salt: str = "ra-corpus-v1") -> dict:
    """Build the corpus in ``out_dir``: fetch (cached in ``out_dir/cache``), clean, split, tokenize, write.

    Returns the manifest. Raises if any source cannot be fetched or read (never substitutes other data).
    """
    if isinstance(sources, str):
        sources = [s for s in sources.split(",") if s]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise DataError(f"sources must be a non-empty subset of {list(SOURCES)}; got {list(sources)}")
    _check_tokenizer(tokenizer)
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 0.5:
            raise DataError(f"{name} must be in (0, 0.5); got {frac!r}")
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    tok = get_tokenizer(tokenizer)
    docs, source_info = [], []
    for name in sources:
        kept, info = _read_source(name, cache)
        docs.extend(kept)
        source_info.append(info)
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate document ids: " + ", ".join(sorted({i for i in ids if ids.count(i) > 1})))
    splits = [split_of(d.doc_id, val_fraction, test_fraction, salt) for d in docs]
    split_info = {"method": "sha256(salt:doc_id) as a uniform number u; val if u < val_fraction, test if "
                            "u < val_fraction + test_fraction, else train",
                  "salt": salt, "val_fraction": val_fraction, "test_fraction": test_fraction}
    return write_corpus(out, docs, splits, tok, source_info, split_info)


def read_fixture(path: str | os.PathLike = FIXTURE) -> tuple[list[Document], list[str]]:
    """Documents and their (explicit) splits from the committed fixture file.

    Format: lines ``<|document|> split=<train|val|test> id=<source/name>`` start a document; ``#`` lines before
    the first one are comments.
    """
    docs, splits, cur = [], [], None
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if m := re.fullmatch(r"<\|document\|> split=(\w+) id=(\S+)", line):
            if m.group(1) not in SPLITS:
                raise DataError(f"{path}: bad split {m.group(1)!r} (expected one of {SPLITS})")
            cur = []
            docs.append((m.group(2), cur))
            splits.append(m.group(1))
        elif cur is not None:
            cur.append(line)
        elif line and not line.startswith("#"):
            raise DataError(f"{path}: text before the first '<|document|>' line: {line[:60]!r}")
    if not docs:
        raise DataError(f"{path}: no '<|document|>' lines")
    return [Document(i.split("/")[0], i, normalize_text("\n".join(t))) for i, t in docs], splits


def prepare_fixture(out_dir: str | os.PathLike, tokenizer: str = "byte") -> dict:
    """Build the train/val/test/manifest layout from the committed ~30 KB fixture (tests, CPU demos; offline).

    The fixture assigns splits explicitly (too few documents for a hash split). ``tokenizer="byte"`` needs no
    download; ``"gpt2"`` fetches the BPE files once.
    """
    _check_tokenizer(tokenizer)
    docs, splits = read_fixture(FIXTURE)
    info = [{"name": "fixture", "kind": "file", "archive": FIXTURE.name, "sha256": sha256_file(FIXTURE),
             "documents": len(docs), "chars": sum(len(d.text) for d in docs)}]
    return write_corpus(out_dir, docs, splits, get_tokenizer(tokenizer), info, {"method": "explicit in fixture"})
