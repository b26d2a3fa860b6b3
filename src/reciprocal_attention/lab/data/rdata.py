"""R's serialization format, the subset that an R data package's lazy-load database needs (``.rdx`` index +
``.rdb`` blobs of character vectors): enough to read ``janeaustenr``'s novels without R.

Malformed input raises ``ValueError`` saying what was expected at which offset.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

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

    def vector(self, typ: int) -> RObject:
        """A logical, integer, double, character vector or list of type ``typ`` (its attributes not yet read)."""
        if typ in (R_LGLSXP, R_INTSXP):
            n = self.length()
            vals = struct.unpack(f">{n}i", self._take(4 * n))
            vals = [None if v == R_NA_INT else (bool(v) if typ == R_LGLSXP else v) for v in vals]
            return RObject(_R_TYPE_NAMES[typ], vals)
        if typ == R_REALSXP:
            n = self.length()
            return RObject("double", list(struct.unpack(f">{n}d", self._take(8 * n))))
        if typ == R_STRSXP:
            n = self.length()
            vals = []
            for _ in range(n):
                cflags = self.int()
                if cflags & 0xFF != R_CHARSXP:
                    raise ValueError(f"R serialization: character vector element of type {cflags & 0xFF}")
                vals.append(self.charsxp(cflags))
            return RObject("character", vals)
        if typ == R_VECSXP:
            return RObject("list", [self.item() for _ in range(self.length())])
        raise ValueError(f"R serialization: SEXP type {typ} at offset {self.pos - 4} is not supported by this "
                         f"reader (it handles NULL, symbols, pairlists, logical/integer/double/character "
                         f"vectors and lists)")

    def item(self) -> Any:
        """The next R object: None for NULL, a str (or None for NA) for a CHARSXP, else an :class:`RObject`."""
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
        obj = self.vector(typ)
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
