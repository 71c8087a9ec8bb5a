"""`write_onnx`: a compiled model as a standard ONNX file that any ONNX runtime can run.

Pipeline: swap every condensed layer for its export form
(`forms.FORMS`) -> `torch.export` with a free batch dimension -> scan the graph and list every op the ONNX
exporter cannot translate, in one error -> `torch.onnx.export` -> `onnx.checker` (full check) -> written to a
temporary file beside ``path`` and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from sparsecc.files import atomic_write
from sparsecc.compiled import CompiledModel
from sparsecc.inputs import as_tuple
from sparsecc.errors import ExportError, InputError, SparseccWarning
from sparsecc.export import forms
from sparsecc.layers import CondensedLayer, first_calls

MODES = ("condensed", "dense")
FORMULATIONS = ("auto", "gather", "rows")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
OPSET = 18


@dataclass
class OnnxExport:
    """What was written: the file, and which formulation each condensed layer got."""

    path: Path
    mode: str
    precision: str
    forms: dict[str, str] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def writable_target(path: Path) -> None:
    """Refuse a path that cannot be written (missing directory, a directory, no permission) with `ExportError`."""
    parent = path.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist (create it first)")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory; give a file name such as {path / 'model.onnx'}")
    try:    # a real probe: permission bits say nothing for root or read-only mounts
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: directory {parent} is not writable ({exc.strerror})") from exc
    os.close(fd)
    os.unlink(probe)


def tensor_inputs(example_inputs: Any) -> tuple[Tensor, ...]:
    inputs = as_tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise InputError("export needs example_inputs: a tensor or a tuple of tensors (batch first)")
    return inputs


def _choose(layer: CondensedLayer, mode: str, formulation: str, per_sample: Optional[int]) -> str:
    if mode == "dense":
        return "dense"
    if formulation == "gather" and (not layer.gathers or layer.values.shape[0] == 0):
        return "rows"      # gather is for fan-in Linear layers with live rows; the others get the next best
    if formulation != "auto":
        return formulation
    return forms.pick(layer, per_sample)


def _positions_per_sample(module: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, int]:
    """Output positions (tokens, pixels) per sample of each condensed layer, from one run on the inputs."""
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    return {layer.weight_fqn: out.numel() // layer.weight_shape[0] // batch
            for layer, _, out in first_calls(module, inputs).values()}


def export_module(module: nn.Module, inputs: tuple[Tensor, ...], mode: str,
                  formulation: str) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``module`` with every condensed layer replaced by its export form."""
    positions = _positions_per_sample(module, inputs) if mode == "condensed" and formulation == "auto" else {}
    module = copy.deepcopy(module)
    chosen: dict[str, str] = {}
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, CondensedLayer):
            continue
        form = _choose(layer, mode, formulation, positions.get(layer.weight_fqn))
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, forms.FORMS[form](layer))
        chosen[layer.weight_fqn] = form
    return module, chosen


def _registry():
    # The exporter's own op registry: private in torch 2.14 (pinned), the only way to list every missing op
    # up front instead of failing on the first.
    from torch.onnx._internal.exporter import _decomp, _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    table = _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))
    return registry, table


#: Run-time checks torch.export records (HF models' ``.to()`` calls, shape asserts): the ONNX exporter drops them.
_ASSERTIONS = frozenset({torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
                         torch.ops.aten.sym_constrain_range_for_size.default})


def unsupported_ops(program: torch.export.ExportedProgram) -> dict[str, list[str]]:
    """Every op in ``program`` the ONNX exporter cannot translate -> the modules that call it."""
    registry, table = _registry()
    decomposed = program.run_decompositions(table)
    missing: dict[str, list[str]] = {}
    for node in decomposed.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target not in _ASSERTIONS and not registry.get_decomps(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            where = next(reversed(stack.values()))[0] if stack else node.name
            missing.setdefault(str(node.target), []).append(where or "<top level>")
    return missing


def refuse_missing(missing: dict[str, list[str]], into: str, fix: str) -> None:
    """One `ExportError` listing every op without a translation (and where it is called), or nothing."""
    if missing:
        listed = "; ".join(f"{op} (in {', '.join(sorted(set(where))[:3])})" for op, where in sorted(missing.items()))
        raise ExportError(f"{len(missing)} op(s) have no {into} translation: {listed}. {fix}")


def batch_of_two(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Example inputs with a batch of 2: torch.export would specialise a batch of 1 to 1."""
    return tuple(torch.cat([t[:1], t[:1]]) for t in inputs)


def _write(onnx_program, path: Path) -> None:
    import onnx

    def write(tmp: str) -> None:
        onnx_program.save(tmp, external_data=False)
        onnx.checker.check_model(tmp, full_check=True)

    atomic_write(path, write)


def _warn_not_2to4(path: Path) -> None:
    """Dense exports feed TensorRT's sparse builder: warn for each half-sparse weight it cannot use."""
    from sparsecc.export.check import check_2to4

    for entry in check_2to4(path):
        if not entry.ok and 0.45 <= entry.sparsity <= 0.55:
            warnings.warn(f"{entry.node} ({entry.initializer}): {entry.reason}; TensorRT will run it dense",
                          SparseccWarning, stacklevel=3)


def check_arguments(path: Path, mode: str, formulation: str, precision: str) -> None:
    """Refuse bad export arguments before anything is compiled or written."""
    if mode not in MODES:
        raise InputError(f"mode={mode!r}: choose one of {MODES}")
    if formulation not in FORMULATIONS:
        raise InputError(f"formulation={formulation!r}: choose one of {FORMULATIONS}")
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}: choose one of {sorted(PRECISIONS)}")
    writable_target(path)


def write_onnx(compiled: CompiledModel, inputs: tuple[Tensor, ...], path: Path, *, mode: str = "condensed",
               formulation: str = "auto", precision: str = "fp32") -> OnnxExport:
    """Write a compiled model as ONNX (see `sparsecc.export_onnx` for the modes and formulations)."""
    check_arguments(path, mode, formulation, precision)
    module, chosen = export_module(compiled.module, inputs, mode, formulation)
    dtype = PRECISIONS[precision]
    args = batch_of_two(inputs)
    if dtype != torch.float32:
        module = module.to(dtype)
        args = tuple(t.to(dtype) if t.is_floating_point() else t for t in args)
    names = [f"input{i}" for i in range(len(args))]
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} for _ in args)
    try:
        program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the message is what matters
        raise ExportError(f"torch.export could not capture the model with a free batch dimension: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0]} (a .pt2 program recorded at a fixed "
                          f"batch size keeps it: export it with dynamic_shapes={{0: torch.export.Dim('batch')}})"
                          ) from exc
    refuse_missing(unsupported_ops(program), "ONNX", "Replace them in the model or register a translation with "
                   "torch.onnx (custom_translation_table)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # the exporter's own progress chatter
        onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=names, opset_version=OPSET,
                                         verbose=False)
    outputs = [v.name for v in onnx_program.model.graph.outputs]
    _write(onnx_program, path)
    if mode == "dense":
        _warn_not_2to4(path)
    return OnnxExport(path, mode, precision, chosen, names, outputs)
