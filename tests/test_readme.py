"""Docs that run: every ```python block of README.md is executed as written, on CPU, in a fresh namespace.

A block is skipped only when a ``<!-- no-test: REASON -->`` comment stands on the line right before its fence (for
code that truly needs a GPU); the reason is required and shown in the skip message.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_NO_TEST = re.compile(r"<!--\s*no-test\s*:?\s*(.*?)\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(first line number, code, skip reason or None)`` for each ```python block of a markdown text."""
    blocks = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _NO_TEST.search(before)
        reason = None
        if marker is not None:
            reason = marker.group(1)
            if not reason:
                raise ValueError(f"README.md:{line}: a no-test marker must say why, e.g. <!-- no-test: needs CUDA -->")
        blocks.append((line + 1, m.group(1), reason))
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_extractor_finds_blocks_and_markers():
    text = ("intro\n```python\nx = 1\n```\n<!-- no-test: needs CUDA -->\n```python\ny = 2\n```\n"
            "```bash\nls\n```\n")
    assert python_blocks(text) == [(3, "x = 1\n", None), (7, "y = 2\n", "needs CUDA")]
    with pytest.raises(ValueError, match="must say why"):
        python_blocks("<!-- no-test -->\n```python\nz = 3\n```\n")
    assert any("ReciprocalAttention" in code for _, code, _ in BLOCKS), "the README's API block was not found"


@pytest.mark.parametrize("line,code,reason", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(f"marked no-test: {reason}")
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
