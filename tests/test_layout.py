"""The package's import graph: no module imports another that (directly or through others) imports it back, and
the library never imports the lab. Every import counts, also those inside functions or ``TYPE_CHECKING`` blocks (a
deferred import hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "reciprocal_attention"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``; a package's ``__init__`` importing its own submodules is its
    public face, not a dependency, and is left out."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        mod, is_pkg = _module(path), path.name == "__init__.py"
        here = mod if is_pkg else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]
            else:
                continue
            for name in names:
                while name and not _is_module(name):
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name.startswith("reciprocal_attention") and name != mod:
                    deps.add(name)
        if is_pkg:
            deps = {d for d in deps if not d.startswith(mod + ".")}
        graph[mod] = deps
    return graph


def test_graph_is_read():
    g = import_graph()
    assert "reciprocal_attention.ops.registry" in g["reciprocal_attention.ops.fold"]
    assert "reciprocal_attention.attention" in g["reciprocal_attention.model"]


def test_no_import_cycles():
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cyclic = sorted(m for m in graph if m in reach(m))
    assert not cyclic, f"modules on an import cycle: {cyclic}"


def test_library_never_imports_the_lab():
    lab = "reciprocal_attention.lab"
    bad = {m: sorted(d for d in deps if d == lab or d.startswith(lab + "."))
           for m, deps in import_graph().items() if not (m == lab or m.startswith(lab + "."))}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}
