"""What the layout promises (docs/architecture.md, "Layout"): sub-packages stacked in one order with imports
running down only (the core types import nothing else), each backend one folder under `runtimes/` found by
name, `passes/` holding passes, no import cycles between modules, each op name spelled in at most three source
files, no function over 60 lines outside the TVMScript kernels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sparsecc.core import patterns, registry

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
        if path.relative_to(ROOT).as_posix() == "runtimes/tvm/kernels.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long


#: Sub-packages from the bottom up: a module imports its own sub-package and those before it, never one after.
#: ``edge`` is the modules at the root of ``sparsecc/`` (the public functions: api, exports, serialize, ...).
LAYERS = ("core", "capture", "planning", "passes", "runtimes", "compiler", "edge", "tooling")
#: What backends share, at the root of ``runtimes/``; everything else there is one folder per backend.
SHARED_RUNTIME_MODULES = {"__init__", "binding", "cpu", "dense", "exporting", "signature", "tuning"}
#: The only imports between backend folders: the ONNX writer (TensorRT and Triton build from its file), the
#: onnxruntime session (Triton's repository is checked in it) and the TensorRT engine builder (Triton's plan).
BACKEND_BASES = {"sparsecc.runtimes.onnxruntime.writer", "sparsecc.runtimes.onnxruntime.engine",
                 "sparsecc.runtimes.tensorrt.engine"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "edge"


def _graph() -> dict[str, set[str]]:
    names = {_module_name(p): p for p in SOURCES}
    return {m: _imports(p, set(names)) - {m} for m, p in names.items()}


def test_layer_names():
    assert [_layer(m) for m in ("sparsecc.core.errors", "sparsecc.core.patterns.fanin", "sparsecc.capture.masks",
                                "sparsecc.planning.narrow", "sparsecc.passes.fold", "sparsecc.runtimes", "sparsecc.runtimes.tvm.runtime",
                                "sparsecc.compiler.pipeline", "sparsecc.api", "sparsecc", "sparsecc.tooling.cli")] \
        == ["core", "core", "capture", "planning", "passes", "runtimes", "runtimes", "compiler", "edge", "edge", "tooling"]


def test_sub_packages_import_downwards_only():
    upward = [f"{m} ({_layer(m)}) imports {d} ({_layer(d)})" for m, deps in sorted(_graph().items())
              for d in sorted(deps) if LAYERS.index(_layer(d)) > LAYERS.index(_layer(m))]
    assert not upward, upward


def test_the_layer_check_sees_an_upward_import():
    graph = {"sparsecc.core.report": {"sparsecc.planning.condense"}}
    assert [d for m, deps in graph.items() for d in deps if LAYERS.index(_layer(d)) > LAYERS.index(_layer(m))]


def test_core_names_no_backend_module():
    """The registry is the one place a backend's module is named; patterns, layers and ops find backends by
    name through it."""
    core = [p for p in SOURCES if p.relative_to(ROOT).parts[:2] == ("sparsecc", "core")]
    assert len(core) > 10
    naming = [p.relative_to(ROOT).as_posix() for p in core if "sparsecc.runtimes" in p.read_text()
              and p.name != "registry.py"]
    assert not naming, naming


def test_each_backend_is_one_folder_under_runtimes():
    runtimes = ROOT / "runtimes"
    for name, module in {**registry.RUNTIMES, **registry.ENGINES}.items():
        assert module.startswith(f"sparsecc.runtimes.{name}."), (name, module)
        assert (runtimes / name / f"{module.rsplit('.', 1)[1]}.py").is_file(), module
    loose = {p.stem for p in runtimes.glob("*.py")} - SHARED_RUNTIME_MODULES
    assert not loose, f"runtimes/ holds backend modules outside a backend folder: {sorted(loose)}"
    folders = {p.name for p in runtimes.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert set(registry.RUNTIMES) | set(registry.ENGINES) <= folders
    for folder in folders:
        assert (runtimes / folder / "__init__.py").read_text().startswith('"""'), f"runtimes/{folder} says nothing"


def test_backends_import_each_other_only_through_the_onnx_file_and_engines():
    def backend(m: str) -> str | None:
        parts = m.split(".")
        return parts[2] if len(parts) > 3 and parts[1] == "runtimes" else None

    crossing = [f"{m} -> {d}" for m, deps in sorted(_graph().items()) for d in sorted(deps)
                if backend(m) and backend(d) and backend(m) != backend(d) and d not in BACKEND_BASES]
    assert not crossing, crossing


def test_tvm_runner_imports_no_torch_and_no_sparsecc():
    """The runner is copied next to a library and run where PyTorch is not installed."""
    tree = ast.parse((ROOT / "runtimes" / "tvm" / "runner.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "sparsecc"}, imported
    package = ast.parse((ROOT / "runtimes" / "tvm" / "__init__.py").read_text())
    assert not [n for n in ast.walk(package) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_passes_hold_passes():
    """Every module in passes/ is a pass (a class with the `Pass` contract of `passes.manager`: name, after,
    requires, call, ensures) or the pass manager; the decisions the passes carry out are `sparsecc/planning`."""
    import importlib
    import inspect as _inspect

    modules = {p.stem for p in (ROOT / "passes").glob("*.py")} - {"__init__", "manager"}
    assert modules, "no pass module found"
    for stem in sorted(modules):
        module = importlib.import_module(f"sparsecc.passes.{stem}")
        found = [c for _, c in _inspect.getmembers(module, _inspect.isclass)
                 if c.__module__ == module.__name__ and all(hasattr(c, a) for a in ("name", "after", "requires", "call",
                                                                                     "ensures"))]
        assert found, f"passes/{stem}.py defines no pass"


def _report_writes(tree: ast.AST) -> list[str]:
    """Statements that write into a report or one of its rows: an assignment to an attribute reached through a
    name containing ``report`` (``c.report.notes = ...``, ``report.layers[0].runtime = ...``), or a call that
    grows one of its lists in place (``report.notes.append(...)``)."""
    def through_report(node: ast.AST) -> bool:
        names = []
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
            names.append(node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", ""))
        return any("report" in n for n in names)

    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        found += [ast.unparse(t) for t in targets if isinstance(t, (ast.Attribute, ast.Subscript)) and through_report(t)]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "append", "extend", "insert", "update") and through_report(node.func.value):
            found.append(ast.unparse(node.func))
    return found


def test_no_compile_stage_writes_the_report():
    """The compiler and everything below it hand back frozen `StageResult`s; the report is built from them
    (`Report.built`), so no module there writes into a report."""
    below_edge = [p for p in SOURCES if (_module_name(p).split(".") + [""])[1] in ("compiler", "planning", "capture", "passes",
                                                                          "runtimes")]
    assert len(below_edge) > 20
    writes = {str(p.relative_to(ROOT)): w for p in below_edge if (w := _report_writes(ast.parse(p.read_text())))}
    assert not writes, writes


def test_the_report_write_check_sees_a_write():
    assert _report_writes(ast.parse("c.report.notes.append('x')\nreport.layers[0].runtime = 'y'\n")) == [
        "report.layers[0].runtime", "c.report.notes.append"]
