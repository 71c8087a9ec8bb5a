"""`save` / `load`: a compiled model as a ``.pt2`` file (torch.export), loadable in a process that imports
only torch and sparsecc (importing sparsecc registers its custom ops).

The file carries ``sparsecc.json``: the file format version and the versions that wrote it. A file written
by an incompatible sparsecc (another format), or not by sparsecc at all, is refused with `VersionError`
rather than failing later inside an op.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from sparsecc.compiled import CompiledModel
from sparsecc.inputs import as_tuple
from sparsecc.errors import InputError, VersionError
from sparsecc.export.onnx_file import batch_of_two
from sparsecc.files import atomic_write
from sparsecc.version import __version__

#: Bump when the ops' signatures or the meaning of their arguments change.
FORMAT = 1
_META = "sparsecc.json"


def _example(compiled: CompiledModel, example_inputs: Any) -> tuple[Tensor, ...]:
    inputs = as_tuple(example_inputs) or compiled.example_inputs()
    if not inputs:
        raise InputError("save needs example_inputs: this model was compiled without any and never called")
    return batch_of_two(inputs)


def save(compiled: nn.Module, path: "str | os.PathLike", example_inputs: Any = None) -> Path:
    """Export ``compiled`` (a `CompiledModel`) with a free batch dimension and write it to ``path``."""
    if not isinstance(compiled, CompiledModel):
        raise InputError(f"save takes what sparsecc.compile returns, got {type(compiled).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    args = _example(compiled, example_inputs)
    batch = torch.export.Dim("batch")
    program = torch.export.export(compiled, args, dynamic_shapes=(tuple({0: batch} for _ in args),))
    ops = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("sparsecc.")})
    meta = {"format": FORMAT, "sparsecc": __version__, "torch": torch.__version__, "ops": ops}
    atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files={_META: json.dumps(meta)}))
    return path


def load(path: "str | os.PathLike") -> nn.Module:
    """The module saved by `save`, callable like the compiled model (any batch size)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"load: {path} is not a file")
    extra = {_META: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a foreign or damaged file
        raise VersionError(f"{path} is not a torch.export file this torch ({torch.__version__}) can read: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    meta: Optional[dict] = json.loads(extra[_META]) if extra[_META] else None
    if meta is None:
        raise VersionError(f"{path} was not written by sparsecc.save (no {_META} inside); load it with "
                           f"torch.export.load")
    if meta.get("format") != FORMAT:
        raise VersionError(f"{path} was written by sparsecc {meta.get('sparsecc')} in file format "
                           f"{meta.get('format')}; this is sparsecc {__version__} (format {FORMAT}). "
                           f"Compile and save the model again with this version")
    return program.module().requires_grad_(False)   # inference: plain calls build no autograd graph
