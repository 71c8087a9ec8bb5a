"""`write_onnx`: a compiled model as a standard ONNX file that any ONNX runtime can run.

Pipeline: swap every condensed layer for its export form
(`forms.FORMS`) -> `torch.export` with a free batch dimension -> scan the graph and list every op the ONNX
exporter cannot translate, in one error -> `torch.onnx.export` -> `onnx.checker` (full check) -> written to a
temporary file beside ``path`` and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.core.compare import TOLERANCE, compare
from sparsecc.core.errors import ExportError, InputError, SparseccWarning
from sparsecc.core.files import atomic_write
from sparsecc.core.inputs import Call
from sparsecc.core.layers import CondensedLayer, first_calls
from sparsecc.runtimes import signature
from sparsecc.runtimes.exporting import refuse_missing, writable_target
from sparsecc.runtimes.onnxruntime import forms

MODES = ("condensed", "dense")
FORMULATIONS = ("auto", "gather", "rows")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


def cast_to(precision: str) -> Optional[torch.dtype]:
    """The dtype a file exported at ``precision`` takes its float inputs in, where the export casts them: fp16's.
    None for an fp32 export, which keeps the model's own dtype (a bf16 / fp16 model's file takes that dtype): its
    inputs go as the model takes them."""
    dtype = PRECISIONS[precision]
    return None if dtype == torch.float32 else dtype


def file_tolerance(precision: str) -> Optional[float]:
    """The output tolerance a file exported at ``precision`` is checked against the model at: the cast dtype's,
    else None (each output's own dtype's: an fp16 model's file is fp16 end to end)."""
    dtype = cast_to(precision)
    return None if dtype is None else TOLERANCE[dtype]
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


def _choose(layer: CondensedLayer, mode: str, formulation: str, per_sample: Optional[int]) -> str:
    if mode == "dense":
        return "dense"
    if formulation == "gather" and (not layer.gathers or layer.values.shape[0] == 0):
        return "rows"      # gather is for fan-in Linear layers with live rows; the others get the next best
    if formulation != "auto":
        return formulation
    return forms.pick(layer, per_sample)


def _positions_per_sample(module: nn.Module, inputs: Call) -> dict[str, int]:
    """Output positions (tokens, pixels) per sample of each condensed layer, from one run on the inputs."""
    first = signature.tensor_leaves(inputs)[0]
    batch = first.shape[0] if first.dim() else 1
    return {layer.weight_fqn: out.numel() // layer.weight_shape[0] // batch
            for layer, _, out in first_calls(module, inputs).values()}


class _Width:
    """A forward pre-hook checking a layer's input width on its export form: a gather or an unfold reads any
    width, and torch.export would otherwise take the axis for free (the layer it stands for fixes it). A hook,
    not a wrapper: the form's parameters keep their names in the file."""

    def __init__(self, axis: int, size: int) -> None:
        self.axis, self.size = axis, size

    def __call__(self, module: nn.Module, args: tuple) -> None:
        torch._check(args[0].shape[self.axis] == self.size)


def export_module(module: nn.Module, inputs: Call, mode: str,
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
        exported = forms.FORMS[form](layer)
        exported.register_forward_pre_hook(_Width(layer._axis, layer.in_size))
        setattr(module.get_submodule(parent) if parent else module, attr, exported)
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


def _write(onnx_program, path: Path, check: Optional[Callable[[str], None]] = None) -> None:
    """Save, check (the ONNX checker, then ``check``) and move into place: a failure leaves nothing."""
    import onnx

    def write(tmp: str) -> None:
        onnx_program.save(tmp, external_data=False)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            hint = (f"ONNX opset {OPSET} has no bfloat16 form of that op (nor has onnxruntime's CPU): export the "
                    f"model in float32 (model.float(), float32 example inputs; precision='fp16' writes a "
                    f"half-precision file)") if "bfloat16" in str(exc) else "the graph holds an op ONNX refuses"
            raise ExportError(f"{path.name}: the ONNX checker refuses the file ({exc}); {hint}") from exc
        if check is not None:
            check(tmp)

    atomic_write(path, write)


def _warn_not_2to4(path: Path) -> None:
    """Dense exports feed TensorRT's sparse builder: warn for each half-sparse weight it cannot use."""
    from sparsecc.runtimes.onnxruntime.check import check_2to4

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


def batched(call: Call) -> Call:
    """The call with every tensor at a batch of 2: torch.export would specialise a batch of 1 to 1."""
    two = lambda t: torch.cat([t[:1], t[:1]]) if isinstance(t, Tensor) and t.dim() else t  # noqa: E731
    return Call(tuple(pytree.tree_map(two, a) for a in call.args),
                {k: pytree.tree_map(two, v) for k, v in call.kwargs.items()})


def _cast(call: Call, dtype: torch.dtype) -> Call:
    cast = lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
    return Call(tuple(pytree.tree_map(cast, a) for a in call.args),
                {k: pytree.tree_map(cast, v) for k, v in call.kwargs.items()})


def _export(module: nn.Module, call: Call, dynamic_axes: Any) -> torch.export.ExportedProgram:
    module = signature.explicit(module.eval(), call)
    try:
        return torch.export.export(module, call.args, dict(call.kwargs),
                                   dynamic_shapes=signature.dynamic_shapes(module, call, dynamic_axes))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the message is what matters
        raise ExportError(f"torch.export could not capture the model with a free batch dimension: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0]} (a .pt2 program recorded at a fixed "
                          f"batch size keeps it: export it with dynamic_shapes={{0: torch.export.Dim('batch')}})"
                          ) from exc


def _check_other_sizes(path: str, program: torch.export.ExportedProgram, call: Call, reference: Callable,
                       precision: str) -> None:
    """Run the written file at other sizes of its free axes (beyond the batch) and compare with ``reference``
    (the user's model) on the same inputs; `ExportError` on the first difference."""
    sizes = signature.other_sizes(program)
    if not sizes:
        return
    try:
        _run_other_sizes(path, program, call, reference, precision, sizes)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the file or the model refused the size: the axis is not free
        raise _NotFree(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


class _NotFree(ExportError):
    """The file or the model does not run at another size of an axis torch.export took for free."""


def _run_other_sizes(path: str, program: torch.export.ExportedProgram, call: Call, reference: Callable,
                     precision: str, sizes: list) -> None:
    from sparsecc.runtimes.onnxruntime.engine import session

    sess = session(path, 1)
    names = signature.input_names(program)
    leaves, spec = pytree.tree_flatten((call.args, dict(call.kwargs)))
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    dtype, tolerance = cast_to(precision), file_tolerance(precision)
    for shapes in sizes:
        moved = list(leaves)
        for slot, shape in zip(slots, shapes):
            moved[slot] = signature.resized(leaves[slot], shape)
        args, kwargs = pytree.tree_unflatten(moved, spec)
        with torch.no_grad():
            expected = [t for t in pytree.tree_leaves(reference(*args, **kwargs)) if isinstance(t, Tensor)]
        feeds = {n: (moved[slot].to(dtype) if moved[slot].is_floating_point() and dtype is not None
                     else moved[slot]).numpy() for n, slot in zip(names, slots)}
        got = [torch.from_numpy(o) for o in sess.run(None, feeds)]
        for i, (g, e) in enumerate(zip(got, expected)):
            stat = compare(f"output {i} at input shapes {shapes}", g.to(e.dtype), e, tolerance)
            if not stat.ok:
                raise _NotFree(f"the exported file differs from your model at other sizes of its free axes: "
                                  f"{stat}; pin them with dynamic_axes='batch' (--static)")


def _settle_dims(graph: Any) -> None:
    """Sizes torch.export first took for free and then found fixed (a layer's width) come out of the exporter as
    symbols named after their value (``"3"``): written as the numbers they are."""
    import onnx_ir as ir

    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is None:
            continue
        dims = [int(str(d.value)) if isinstance(d, ir.SymbolicDim) and str(d.value).isdigit() else d
                for d in value.shape]
        value.shape = ir.Shape(dims)


#: Float dtypes by their ONNX type (`_outputs_in_dtypes`).
_ONNX_FLOATS = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16", torch.float64: "DOUBLE"}


def _outputs_in_dtypes(graph: Any, dtypes: list[torch.dtype]) -> None:
    """Each float output of the file in the dtype the model returns it in. torch.onnx translates a sum over fp16
    as a Cast to float and a ReduceSum, with no Cast back: an fp16 model's ``x.sum(-1)`` came out of the file as
    float32. Such an output gets the Cast back, appended to the graph under the output's name."""
    import onnx_ir as ir

    floats = {getattr(ir.DataType, name) for name in _ONNX_FLOATS.values()}
    for i, (value, dtype) in enumerate(zip(list(graph.outputs), dtypes)):
        want = getattr(ir.DataType, _ONNX_FLOATS.get(dtype, ""), None)
        if want is None or value.dtype not in floats or value.dtype == want:
            continue
        name, value.name = value.name, f"{value.name}_{value.dtype.name.lower()}"
        cast = ir.node("Cast", inputs=[value], attributes={"to": want})
        graph.append(cast)
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = name, want, value.shape
        graph.outputs[i] = out


def write_onnx(module: nn.Module, inputs: "tuple[Tensor, ...] | Call", path: Path, *, mode: str = "condensed",
               formulation: str = "auto", precision: str = "fp32", dynamic_axes: Any = "batch",
               reference: Optional[Callable] = None) -> OnnxExport:
    """Write a compiled model's condensed module (`CompiledModel.module`) as ONNX (see `sparsecc.export_onnx` for the
    modes and formulations). Inputs are named after ``forward``'s parameters (or the keyword inputs' keys), outputs
    after their paths in the output structure (`signature`); ``dynamic_axes`` says which axes are free ("batch": the
    batch only; "auto": also every axis torch.export finds free, then checked against ``reference`` at other sizes
    before the file is kept; where the file or the model fails there, a `SparseccWarning` says why and only the batch is
    free)."""
    check_arguments(path, mode, formulation, precision)
    signature.check_dynamic(dynamic_axes)
    try:
        return _write_onnx(module, Call.of(inputs), path, mode, formulation, precision, dynamic_axes, reference)
    except _NotFree as exc:
        if dynamic_axes != "auto":
            raise
        warnings.warn(f"{path.name}: only the batch axis is free: at other sizes of the axes torch.export found "
                      f"free, {exc}", SparseccWarning, stacklevel=2)
        return _write_onnx(module, Call.of(inputs), path, mode, formulation, precision, "batch", reference)


def _write_onnx(source: nn.Module, call: Call, path: Path, mode: str, formulation: str, precision: str,
                dynamic_axes: Any, reference: Optional[Callable]) -> OnnxExport:
    module, chosen = export_module(source, call, mode, formulation)
    dtype = PRECISIONS[precision]
    example = batched(call)
    if dtype != torch.float32:
        module = module.to(dtype)
        example = _cast(example, dtype)
    program = _export(module, example, dynamic_axes)
    refuse_missing(unsupported_ops(program), "ONNX", "Replace them in the model or register a translation with "
                   "torch.onnx (custom_translation_table)")
    names = signature.input_names(program)
    with torch.no_grad():
        returned = example(module)
    outputs = signature.output_names(returned)
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")    # the exporter's own progress chatter and constant-folding notes
        onnx_program = torch.onnx.export(program, example.args, kwargs=dict(example.kwargs) or None, dynamo=True,
                                         input_names=names, opset_version=OPSET, verbose=False)
    _settle_dims(onnx_program.model.graph)
    graph_outputs = onnx_program.model.graph.outputs
    if len(outputs) == len(graph_outputs):
        for value, name in zip(graph_outputs, outputs):
            value.name = name
        _outputs_in_dtypes(onnx_program.model.graph,
                           [t.dtype for t in pytree.tree_leaves(returned) if isinstance(t, Tensor)])
    outputs = [v.name for v in graph_outputs]
    check = None
    if dynamic_axes != "batch":
        ref = reference or source
        check = lambda tmp: _check_other_sizes(tmp, program, call, ref, precision)  # noqa: E731
    _write(onnx_program, path, check)
    if mode == "dense":
        _warn_not_2to4(path)
    return OnnxExport(path, mode, precision, chosen, names, outputs)
