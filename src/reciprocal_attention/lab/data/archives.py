"""Reading Debian packages in place: the Unix ``ar`` container of a ``.deb`` and the tar archives inside it."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator


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
