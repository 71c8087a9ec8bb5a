"""What the layout promises (docs/architecture.md): no import cycles between sparsecc's modules, each op name
spelled in at most three source files, no function over 60 lines outside the TVMScript kernels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sparsecc import patterns

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sparsecc": "sparsecc", "passes": "sparsecc.passes", "runtimes": "sparsecc.runtimes"}
SOURCES = [p for d in PACKAGES for p in sorted((ROOT / d).rglob("*.py"))]


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[folder], *parts])


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every sparsecc module ``path`` imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparsecc"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs
            if len(subs) < len(node.names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sparsecc")}
    return found & modules


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (a path that comes back to its start), or []."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_no_import_cycles():
    names = {_module_name(p): p for p in SOURCES}
    graph = {m: _imports(p, set(names)) - {m} for m, p in names.items()}
    assert graph["sparsecc.api"], "the import scan found nothing: it is broken"
    assert _cycle(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("op", sorted(patterns.ops()))
def test_each_op_name_is_spelled_in_at_most_three_source_files(op):
    files = [p.relative_to(ROOT) for p in SOURCES if op in p.read_text()]
    assert 1 <= len(files) <= 3, files


def test_functions_outside_the_tvmscript_kernels_are_at_most_60_lines():
    long = []
    for path in SOURCES:
        if path.name == "tvm_kernels.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long
