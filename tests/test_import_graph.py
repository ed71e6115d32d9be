"""The package's import graph: no cycles, and library modules never import the command-line package."""

from __future__ import annotations

import ast
from pathlib import Path

import ftedit

ROOT = Path(ftedit.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """ftedit modules ``path`` imports, at module level or inside functions (``from a import b``: ``a.b`` if
    that is a module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, name, modules) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ftedit.editor import edit\n\nfrom . import registry\n")
    found = _imports(src, "ftedit.m", {"ftedit.editor", "ftedit.registry", "ftedit"})
    assert found == {"ftedit.editor", "ftedit.registry"}


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_library_modules_never_import_the_commands():
    graph = import_graph()
    offenders = {name: sorted(m for m in deps if m == "ftedit.commands" or m.startswith("ftedit.commands."))
                 for name, deps in graph.items() if not name.startswith(("ftedit.commands", "ftedit.__main__"))}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "ftedit.commands.edit" in graph["ftedit.commands"]  # the graph does see the commands' imports
