"""Public entry points: `compile`, `inspect`, `validate`, and the `CompiledModel` they return."""

from __future__ import annotations

import copy
import itertools
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.autotune import autotune as tune
from sparsecc.autotune import disable as disable_tuning
from sparsecc.errors import EquivalenceError, InputError
from sparsecc.export.onnx_file import PRECISIONS
from sparsecc.layers import dense_semantics
from sparsecc.passes.capture import capture
from sparsecc.passes.condense import Decision, plan
from sparsecc.passes.fold import FoldBatchNorm
from sparsecc.passes.manager import PassManager
from sparsecc.passes.masks import Prepared, prepare
from sparsecc.passes.narrow import narrow as narrow_network
from sparsecc.passes.rewrite import CondenseFunctionalOps, CondenseModules, DropUnusedWeights, swap_modules
from sparsecc.report import Report, layer_report
from sparsecc.runtimes import ENGINES, engine, resolve
from sparsecc.validation import TOLERANCE, Validation, random_like, run_validation

log = logging.getLogger("sparsecc")

InputSpec = tuple[tuple[torch.dtype, torch.Size], ...]


def _as_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _spec(inputs: tuple) -> InputSpec:
    return tuple((t.dtype, t.shape[1:]) for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor))


def _elem_bytes(prepared: Prepared) -> int:
    for layer in prepared.layers.values():
        return prepared.reference.get_parameter(layer.fqn).element_size()
    return 4


def _report(decisions: dict[str, Decision], runtime: str, prepared: Prepared) -> Report:
    layers = [layer_report(d, _elem_bytes(prepared)) for d in decisions.values()]
    notes = ["model was in train mode: compiled an eval() copy"] if prepared.was_training else []
    return Report(layers, runtime=runtime, notes=notes)


class CompiledModel(nn.Module):
    """The rewritten model. Calls check inputs against what was compiled (free batch dimension); without
    example inputs at compile time, the first call fixes that and is validated against the reference."""

    def __init__(self, module: nn.Module, report: Report, pending: Optional[Prepared],
                 spec: Optional[InputSpec]) -> None:
        super().__init__()
        self.module = module
        self.report = report
        self._pending = pending     # what the first call is validated against, when compile had no inputs
        self._spec = spec

    def _check_inputs(self, inputs: tuple) -> Sequence[Tensor]:
        """Raise `InputError` for inputs the compiled model does not take; returns the tensor inputs."""
        spec = self._spec
        if spec is not None and len(inputs) == len(spec):
            for t, (dt, shape) in zip(inputs, spec):   # the common case without pytree: this runs on every call
                if type(t) is not Tensor or t.dtype != dt or t.shape[1:] != shape or not t.is_cpu:
                    break
            else:
                return inputs
        leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
        self._check_device(leaves)
        got = _spec(inputs)
        if spec is None:
            self._spec = got
            return leaves
        if len(got) != len(spec):
            raise InputError(f"called with {len(got)} tensor input(s); compiled for {len(self._spec)}")
        for i, ((dt, shape), (edt, eshape)) in enumerate(zip(got, spec)):
            if dt != edt or shape != eshape:
                raise InputError(f"input {i}: got {dt} of shape (N, {', '.join(map(str, shape))}); compiled for "
                                 f"{edt} of shape (N, {', '.join(map(str, eshape))}) with a free batch size N; "
                                 f"cast the input or compile again with example inputs of the new shape")
        return leaves

    def _check_device(self, inputs: list[Tensor]) -> None:
        here = next((t.device for t in itertools.chain(self.module.parameters(), self.module.buffers())),
                    torch.device("cpu"))
        for i, t in enumerate(inputs):
            if t.device != here:
                raise InputError(f"input {i} is on {t.device}; the compiled model's tensors are on {here}: move the "
                                 f"input with .to({str(here)!r}) (sparsecc's op runtimes run on the CPU)")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():      # torch.export / dynamo trace the module: no data checks
            return self.module(*args, **kwargs)
        tensors = self._check_inputs((*args, kwargs) if kwargs else args)
        # A sum is finite only if every element is (or it overflowed: then dense semantics, still exact).
        finite = all(math.isfinite(t.sum()) for t in tensors if t.is_floating_point())
        if self._pending is not None and not kwargs:
            _validate_into(self.report, self._pending, self.module, [args, random_like(args)])
            self._pending = None
        if not finite:
            with dense_semantics():
                return nn.Module.__call__(self.module, *args, **kwargs)
        # nn.Module's call (hooks included) without GraphModule's traceback wrapper: ~2 us of a batch-1 call.
        return nn.Module.__call__(self.module, *args, **kwargs)


def _validate_into(report: Report, prepared: Prepared, module: nn.Module, input_sets: Sequence[tuple],
                   tolerance: Optional[float] = None, work: Optional[Prepared] = None) -> Validation:
    """Validate ``module`` against the user's model as run, its layers against ``work``'s weights (the
    narrowed copy, when there is one), and record the result in ``report``."""
    work = work or prepared
    result = run_validation(prepared.user, module, input_sets, work.layers, tolerance, work.reference,
                            rebuilt=prepared.reference)
    by_name = {lay.name: lay for lay in report.layers}
    for fqn, stat in result.layers.items():
        by_name[fqn].error = stat
    for fqn, n in result.positions.items():
        by_name[fqn].positions = n
    report.end_to_end = result.end_to_end
    report.validated = True
    if not result.ok:
        raise EquivalenceError(result.message(), report)
    return result


def _on_engine(name: str, compiled: "CompiledModel", reference: nn.Module, inputs: tuple,
               options: Mapping[str, Any]) -> nn.Module:
    """Export the rewritten model for engine ``name`` and load it; the report says which form each layer got."""
    from sparsecc.export.onnx_file import export_onnx

    eng = engine(name)
    unknown = sorted(set(options) - set(eng.OPTIONS))
    if unknown:
        raise InputError(f"runtime_options {unknown} are not understood by {name}; it takes {list(eng.OPTIONS)}")
    options = dict(options)
    given = options.pop("onnx_path", None)
    folder = None if given else tempfile.mkdtemp(prefix="sparsecc-")
    path = Path(given) if given else Path(folder) / "model.onnx"
    try:
        exported = export_onnx(compiled, inputs, path, **eng.EXPORT)
        with torch.no_grad():
            outputs = pytree.tree_flatten(reference(*inputs))[1]
        runner = eng.load(exported.path, exported.input_names, outputs, example_inputs=inputs, **options)
    finally:
        if folder is not None and not eng.KEEPS_FILE:
            shutil.rmtree(folder, ignore_errors=True)
    for layer in compiled.report.condensed:
        layer.runtime = f"{name} ({exported.forms.get(layer.name, 'dense')})"
    compiled.report.runtime = name
    compiled.report.notes.append(f"{name} runs the whole exported graph: validated end to end only (its layers "
                                 f"are not observable one by one)")
    return runner


def _has_ablated(prepared: Prepared, module: str) -> bool:
    """Whether a layer (or ``"<model>"``) had neurons that narrowing could have removed: the notes name only those."""
    layer = prepared.layers.get(f"{module}.weight")
    return layer is None or not bool(layer.mask.reshape(layer.mask.shape[0], -1).any(1).all())


def compile(model: nn.Module, example_inputs: Any = None, *, masks: Optional[Mapping[str, Tensor]] = None,
            backend: str = "auto", validate: bool = True, autotune: bool = True,
            runtime_options: Optional[Mapping[str, Any]] = None, narrow: Optional[bool] = None) -> CompiledModel:
    """Condense the sparse layers of ``model`` and return a drop-in callable with a ``report``.

    ``masks`` maps weight names (``"fc1.weight"``) to boolean masks and wins over prune hooks,
    parametrizations and zeros. With ``validate`` (default) outputs are checked against the masked model on
    ``example_inputs`` and one random input of the same shapes, or on the first call when there are none.
    With ``autotune`` (default) each condensed layer runs its sparse kernel or its dense op, whichever the
    runtime measures faster on this machine for the call's token count and torch's thread count (cached on
    disk, `sparsecc.runtimes.tuning`); the report gives the choice and both times at the example inputs.
    ``autotune=False`` runs the sparse kernels everywhere. The user's model is never modified.

    ``backend`` is an op runtime (``"tvm"``, ``"reference"``, ``"auto"``) or an engine that runs the whole
    exported model (``"onnxruntime"``, ``"tensorrt"``; needs ``example_inputs``). ``runtime_options`` go to
    the engine, e.g. ``{"threads": 1}`` for onnxruntime or ``{"onnx_path": ...}`` to keep the exported file.

    Narrowing (on whenever ``example_inputs`` are given, ``narrow=False`` turns it off) first removes ablated
    neurons and unused channels from the network itself (`sparsecc.passes.narrow`): producers, BatchNorms and
    consumers get narrower, consumers' biases absorb the constants; the report's notes list widths before and
    after and what was left and why.
    """
    prepared = prepare(model, masks)
    if narrow and example_inputs is None:
        raise InputError("narrow=True checks the narrowed network on the example inputs: pass example_inputs")
    narrow = example_inputs is not None if narrow is None else narrow
    on_engine = backend in ENGINES
    if on_engine and example_inputs is None:
        raise InputError(f"backend={backend!r} exports the model: pass example_inputs")
    if runtime_options and not on_engine:
        raise InputError(f"runtime_options are for the engines {sorted(ENGINES)}; backend={backend!r} takes none")
    op_backend = "reference" if on_engine else backend
    runtime = resolve(op_backend)
    inputs = _as_tuple(example_inputs)
    work, narrowing = prepared, None
    if narrow:
        narrowing = narrow_network(prepared, inputs)
        if narrowing.removals:      # else the unchanged copy is dropped: a model's worth of memory
            work = Prepared(narrowing.model, narrowing.layers, prepared.was_training)
    decisions = plan(work, op_backend)
    report = _report(decisions, runtime, work)
    if narrowing is not None:
        report.notes += [f"narrowed {r}" for r in narrowing.removals] or ["narrow: no channel removed"]
        report.notes += [f"not narrowed {p}: {why}" for p, why in narrowing.skipped.items()
                         if why != "no ablated or unused channels" and _has_ablated(prepared, p)]
    captured = capture(work.reference, len(inputs) if example_inputs is not None else None)
    if captured.graph_module is not None:
        rewrites = [CondenseModules(decisions), CondenseFunctionalOps(decisions)]
        fold = FoldBatchNorm()
        manager = PassManager([*rewrites, fold, DropUnusedWeights(decisions)])
        module: nn.Module = manager.run(captured.graph_module)
        applied = set().union(*(p.applied for p in rewrites))
        report.rewrites = manager.rewrites
        if fold.folded:
            report.notes.append(f"{len(fold.folded)} BatchNorm(s) folded into the condensed convolution before "
                                f"them: {', '.join(fold.folded)}")
    else:
        module, report.rewrites, applied = swap_modules(copy.deepcopy(work.reference), decisions)
        report.capture_reason = captured.reason
    report.capture = captured.method
    for layer in report.layers:
        if layer.action != "kept" and layer.name not in applied:
            why = ("a functional linear needs a traced graph" if captured.graph_module is None
                   else "not called as a module or F.linear on the parameter in the traced graph")
            layer.keep(f"condensable but not rewritten: {why}")
    if not autotune:
        disable_tuning(module)
    elif example_inputs is not None and not on_engine:
        tune(module, inputs, report)
    tolerance = None
    if on_engine:
        module = _on_engine(backend, CompiledModel(module, report, None, None), prepared.user, inputs,
                            runtime_options or {})
        tolerance = TOLERANCE[PRECISIONS[engine(backend).EXPORT["precision"]]]
    if validate and example_inputs is not None:
        _validate_into(report, prepared, module, [inputs, random_like(inputs)], tolerance, work)
    module.requires_grad_(False)    # inference: plain calls build no autograd graph (inputs may still want grads)
    validate_first_call = validate and example_inputs is None
    compiled = CompiledModel(module, report, prepared if validate_first_call else None,
                             _spec(inputs) if example_inputs is not None else None)
    log.info("%s", report.summary())
    return compiled


def inspect(model: nn.Module, example_inputs: Any = None, *, masks: Optional[Mapping[str, Tensor]] = None) -> Report:
    """The per-layer report (structure, bytes, FLOPs) without compiling. With ``example_inputs`` FLOPs are per
    call; without, per output position (token or pixel)."""
    prepared = prepare(model, masks)
    report = _report(plan(prepared, "reference"), "reference", prepared)
    report.compiled = False
    inputs = _as_tuple(example_inputs)
    if inputs:
        result = run_validation(prepared.reference, prepared.reference, [inputs], prepared.layers)
        for layer in report.layers:
            layer.positions = result.positions.get(layer.name)
    return report


def masked_reference(model: nn.Module, masks: Optional[Mapping[str, Tensor]] = None) -> nn.Module:
    """An eval-mode copy of ``model`` with its masks baked into plain weights: what compiled models equal."""
    return prepare(model, masks).reference


def validate(reference_model: nn.Module, compiled_model: nn.Module, inputs: Any) -> Validation:
    """Compare ``compiled_model`` with ``reference_model`` as the user runs it (hooks and parametrizations live)
    on ``inputs``, and each condensed layer with its masked weights; returns the result (check ``.ok``) without
    raising."""
    prepared = prepare(reference_model)
    module = compiled_model.module if isinstance(compiled_model, CompiledModel) else compiled_model
    return run_validation(prepared.user, module, [_as_tuple(inputs)], prepared.layers,
                          weights_from=prepared.reference, rebuilt=prepared.reference)
