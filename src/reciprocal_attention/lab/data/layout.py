"""What a prepared corpus is on disk, shared by the writer (``corpus``) and the reader (``loader``), and the
errors the data code raises for things the user can fix.

A corpus directory holds ``train.bin``, ``val.bin`` and ``test.bin`` (``uint16`` token ids, one end-of-text token
after every document) and ``manifest.json`` (format, tokenizer, sources, per-split token counts and sha256).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT = "reciprocal_attention.corpus/1"
DTYPE = np.uint16


class DataError(UserError, ValueError):
    """Bad data input: an unknown source, split or tokenizer, a fraction out of range, an unreadable archive."""


class CorpusError(DataError):
    """A prepared corpus directory is inconsistent with its manifest, corrupt, or unusable as asked."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """A corpus directory, its manifest or one of its split files does not exist."""


@dataclass
class Document:
    """One unit of the split: a play, a novel, a book of the Bible, a documentation file."""

    source: str
    doc_id: str
    text: str


def rebuild_hint(data_dir: object) -> str:
    """The command that rebuilds the corpus in ``data_dir`` (quoted in error messages)."""
    return f"rebuild with `ra data prepare --out {data_dir}`"
