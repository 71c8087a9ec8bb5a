"""`save` / `load`: a compiled model as a ``.pt2`` file (torch.export), loadable in a process that imports
only torch and sparsecc (importing sparsecc registers its custom ops).

The file carries ``sparsecc.json``: the file format version and the versions that wrote it. A file written
by an incompatible sparsecc (another format), or not by sparsecc at all, is refused with `VersionError`
rather than failing later inside an op.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from sparsecc.compiler.compiled import CompiledModel
from sparsecc.compiler.precision import AtPrecision
from sparsecc.core.errors import InputError, VersionError
from sparsecc.core.files import atomic_write
from sparsecc.core.inputs import Arrangement, Call, example_call
from sparsecc.core.version import __version__
from sparsecc.runtimes import signature
from sparsecc.runtimes.onnxruntime.writer import batched

#: Bump when the ops' signatures or the meaning of their arguments change.
FORMAT = 1
_META = "sparsecc.json"


def _example(compiled: CompiledModel, example_inputs: Any, example_kwargs: Optional[Mapping[str, Any]]) -> Call:
    call = example_call(example_inputs, example_kwargs) if example_inputs is not None or example_kwargs else \
        compiled.example_call()
    if call is None or not call.tensors():
        raise InputError("save needs example_inputs: this model was compiled without any and never called")
    return batched(call)


def _program(compiled: CompiledModel, call: Call) -> torch.export.ExportedProgram:
    """torch.export of the compiled model with a free batch, at the precision it runs (``precision="bf16"``:
    autocast and float32 outputs are in the program). Keyword calls export the rewritten model itself, whose
    ``forward`` names the inputs (torch.export cannot guard a ``**kwargs`` wrapper's inputs)."""
    dtype = compiled.__dict__.get("_dtype")
    if call.kwargs:
        named = signature.explicit(compiled.module, call)     # inputs that bind to **kwargs get names
        # at a precision: the autocast wrapper, bound by the named forward's signature (a **kwargs forward
        # exports, but its program's guards name no inputs)
        module = named if dtype is None else signature.with_parameters(
            AtPrecision(named, dtype), inspect.signature(named.forward).parameters.values())
        return torch.export.export(module, call.args, dict(call.kwargs),
                                   dynamic_shapes=signature.dynamic_shapes(named, call, "batch"))
    batch = torch.export.Dim("batch")
    return torch.export.export(compiled, call.args, dynamic_shapes=(tuple({0: batch} for _ in call.args),))


def save(compiled: nn.Module, path: "str | os.PathLike", example_inputs: Any = None, *,
         example_kwargs: Optional[Mapping[str, Any]] = None) -> Path:
    """Export ``compiled`` (a `CompiledModel`) with a free batch dimension and write it to ``path``. The example
    call is ``example_inputs`` / ``example_kwargs`` (default: the one it was compiled or first called with);
    the loaded module takes the calls the model takes (keywords by name)."""
    if not isinstance(compiled, CompiledModel):
        raise InputError(f"save takes what sparsecc.compile returns, got {type(compiled).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    call = _example(compiled, example_inputs, example_kwargs)
    program = _program(compiled, call)
    ops = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("sparsecc.")})
    shell = compiled.__dict__.get("_shell") or compiled.module
    meta = {"format": FORMAT, "sparsecc": __version__, "torch": torch.__version__, "ops": ops,
            "inputs": Arrangement.of(shell.forward, call).to_json(),
            "imports": _type_modules(program.call_spec.out_spec)}
    atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files={_META: json.dumps(meta)}))
    return path


def _type_modules(spec: Any) -> list[str]:
    """The modules defining the container types of a pytree spec beyond the builtins (``ModelOutput``
    subclasses): a fresh process must import them before torch can read the program's signature."""
    found: set[str] = set()
    stack = [spec]
    while stack:
        node = stack.pop()
        kind = getattr(node, "type", None)
        if kind is not None and kind.__module__ not in ("builtins", "collections", "torch.fx.immutable_collections"):
            found.add(kind.__module__)
        stack.extend(node.children() if hasattr(node, "children") else ())
    return sorted(found)


def _import_output_types(path: Path, modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise VersionError(f"{path} returns types from {name}, which cannot be imported here ({exc}): install "
                               f"the package that defines them (the model's own library)") from exc


class SavedModel(nn.Module):
    """A loaded ``.pt2``, called as the model is: inputs by position or by keyword, bound to the example call
    it was saved with (`InputError` names a missing or unknown input)."""

    def __init__(self, program: nn.Module, arrangement: Optional[Arrangement]) -> None:
        super().__init__()
        self.program = program
        self.arrangement = arrangement

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = self.arrangement.arrange(args, kwargs) if self.arrangement is not None else Call(args, kwargs)
        return call(self.program)


def _read_meta(path: Path) -> Optional[dict]:
    """``sparsecc.json`` from the archive, read before the program: it names what to import first."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"extra/{_META}")), None)
            return json.loads(archive.read(name)) if name else None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise VersionError(f"{path} is not a torch.export file this torch ({torch.__version__}) can read: "
                           f"{type(exc).__name__}: {exc}") from exc


def load(path: "str | os.PathLike") -> nn.Module:
    """The module saved by `save`, callable like the model (any batch size; keyword inputs by name)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"load: {path} is not a file")
    meta = _read_meta(path)
    if meta is None:
        raise VersionError(f"{path} was not written by sparsecc.save (no {_META} inside); load it with "
                           f"torch.export.load")
    if meta.get("format") != FORMAT:
        raise VersionError(f"{path} was written by sparsecc {meta.get('sparsecc')} in file format "
                           f"{meta.get('format')}; this is sparsecc {__version__} (format {FORMAT}). "
                           f"Compile and save the model again with this version")
    _import_output_types(path, meta.get("imports", []))
    try:
        program = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a foreign or damaged file
        raise VersionError(f"{path} is not a torch.export file this torch ({torch.__version__}) can read: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    arrangement = Arrangement.from_json(meta["inputs"]) if "inputs" in meta else None
    # inference: plain calls build no autograd graph
    return SavedModel(program.module().requires_grad_(False), arrangement)
