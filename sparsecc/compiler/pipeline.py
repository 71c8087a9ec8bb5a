"""`sparsecc.compile` as a pipeline of named stages over one `Compilation`:

masks -> narrow -> analyse -> bind -> capture -> condense -> fold -> precision -> tune -> engine -> validate

Each stage reads and extends the `Compilation` and returns a one-line summary, or None when it did not apply
(no example inputs to narrow with, no traced graph to fold, ...); `run` times each one and keeps its outcome in
the report (`Report.stages`), next to the typed results the stages leave there (`Report.narrowed`,
`Report.folded`, `Report.rewrites`, per-layer rows). Graph stages run their passes with the `PassManager`.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from sparsecc import runtimes
from sparsecc.capture.graph import Captured, capture, exported_graph
from sparsecc.capture.masks import Prepared, prepare, structural_copy
from sparsecc.compiler import precision as _precision
from sparsecc.compiler.autotune import autotune, disable, stream_if_large
from sparsecc.compiler.compiled import validate_into
from sparsecc.compiler.validation import TOLERANCE, input_sets
from sparsecc.core.errors import InputError
from sparsecc.core.inputs import Arrangement, Call
from sparsecc.core.report import Report, StageOutcome
from sparsecc.passes.fold import FoldBatchNorm, fold_in_place
from sparsecc.passes.manager import PassManager
from sparsecc.passes.rewrite import CondenseFunctionalOps, CondenseModules, DropUnusedWeights, swap_modules
from sparsecc.planning.condense import Decision, layer_report, plan
from sparsecc.planning.narrow import Narrowing, narrow

#: Each stage as it ends (the command line shows these; silent otherwise).
progress = logging.getLogger("sparsecc.progress")


@dataclass(frozen=True)
class Options:
    """What `compile` was asked for, checked."""

    backend: str                  # the op runtime or engine named by the user
    runtime: str                  # the op runtime it resolves to on this machine (engines: "reference")
    validate: bool
    autotune: bool
    narrow: bool
    has_inputs: bool              # example inputs were given (else the first call fixes and validates them)
    runtime_options: Mapping[str, Any] = field(default_factory=dict)
    precision: str = "fp32"       # `sparsecc.compiler.precision`: the dtype an fp32 model runs in
    dtype: Optional[torch.dtype] = None    # what ``precision`` means (None: the model's own)

    @property
    def on_engine(self) -> bool:
        return self.backend in runtimes.ENGINES

    @property
    def op_backend(self) -> str:
        """Engines export the graph the reference runtime runs."""
        return "reference" if self.on_engine else self.backend


@dataclass
class Compilation:
    """The state the stages pass along."""

    model: nn.Module
    masks: Optional[Mapping[str, Any]]
    inputs: Call                  # the example call (empty without example inputs)
    options: Options
    prepared: Optional[Prepared] = None       # the user's model, its masks, the masked reference
    work: Optional[Prepared] = None           # what is condensed: the narrowed copy when narrowing removed channels
    narrowing: Optional[Narrowing] = None
    decisions: dict[str, Decision] = field(default_factory=dict)
    report: Optional[Report] = None
    captured: Optional[Captured] = None
    module: Optional[nn.Module] = None
    tolerance: Optional[float] = None
    passes: tuple[str, ...] = ()              # the graph passes that have run, in order


def masks(c: Compilation) -> str:
    c.prepared = c.work = prepare(c.model, c.masks)
    sources = sorted({str(layer.source) for layer in c.prepared.layers.values()})
    return f"{len(c.prepared.layers)} weights; masks from {', '.join(sources) or 'nothing'}"


def narrow_stage(c: Compilation) -> Optional[str]:
    if not c.options.narrow:
        return None
    c.narrowing = narrow(c.prepared, c.inputs)
    if c.narrowing.removals:      # else the unchanged copy is dropped: a model's worth of memory
        c.work = Prepared(c.narrowing.model, c.narrowing.layers, c.prepared.was_training)
    return (f"{len(c.narrowing.removals)} producer(s) narrowed, {len(c.narrowing.skipped)} left "
            f"(graph from {c.narrowing.graph})")


def _has_ablated(prepared: Prepared, module: str) -> bool:
    """Whether a layer (or ``"<model>"``) had neurons that narrowing could have removed: notes name only those."""
    layer = prepared.layers.get(f"{module}.weight")
    return layer is None or not bool(layer.mask.reshape(layer.mask.shape[0], -1).any(1).all())


def _elem_bytes(prepared: Prepared) -> int:
    for layer in prepared.layers.values():
        return prepared.reference.get_parameter(layer.fqn).element_size()
    return 4


def new_report(decisions: dict[str, Decision], runtime: str, prepared: Prepared) -> Report:
    layers = [layer_report(d, _elem_bytes(prepared)) for d in decisions.values()]
    notes = ["model was in train mode: compiled an eval() copy"] if prepared.was_training else []
    if prepared.linearized:
        notes.append(f"{len(prepared.linearized)} transposed-weight linear(s) (transformers Conv1D) analysed and "
                     f"condensed as nn.Linear: {', '.join(prepared.linearized[:4])}"
                     + (", ..." if len(prepared.linearized) > 4 else ""))
    return Report(layers, runtime=runtime, notes=notes)


def analyse(c: Compilation) -> str:
    c.decisions = plan(c.work)
    c.report = new_report(c.decisions, c.options.runtime, c.work)
    if c.narrowing is not None:
        c.report.narrowed = list(c.narrowing.removals)
        c.report.notes += [f"narrowed {r}" for r in c.narrowing.removals] or ["narrow: no channel removed"]
        if c.narrowing.graph != "torch.fx":
            c.report.notes.append(f"narrowing read the graph from {c.narrowing.graph}")
        c.report.notes += [f"not narrowed {p}: {why}" for p, why in c.narrowing.skipped.items()
                           if why != "no ablated or unused channels" and _has_ablated(c.prepared, p)]
    condensable = sum(d.replacement is not None for d in c.decisions.values())
    return f"{condensable}/{len(c.decisions)} layers condensable"


def bind(c: Compilation) -> str:
    """Each condensed layer's runtime: the backend's, or the first in preference order that runs its op."""
    rows = {lay.name: lay for lay in c.report.layers}
    for fqn, d in c.decisions.items():
        if d.replacement is None:
            continue
        weight = c.work.reference.get_parameter(fqn)
        d.replacement.runtime, why = runtimes.for_op(c.options.op_backend, d.replacement.op, weight.dtype)
        d.reason = "; ".join(filter(None, [d.reason, why]))
        rows[fqn].runtime, rows[fqn].reason = d.replacement.runtime, d.reason
    used = sorted({d.replacement.runtime for d in c.decisions.values() if d.replacement is not None})
    return f"runtimes {', '.join(used) or 'none'}"


def capture_stage(c: Compilation) -> str:
    c.captured = capture(c.work.reference, c.inputs if c.options.has_inputs else None)
    c.report.capture = c.captured.method
    if c.captured.graph_module is None:
        c.report.capture_reason = c.captured.reason
    return c.captured.method + (f" ({c.captured.reason})" if c.captured.reason else "")


def condense(c: Compilation) -> str:
    if c.captured.graph_module is not None:
        manager = PassManager([CondenseModules(c.decisions), CondenseFunctionalOps(c.decisions),
                               DropUnusedWeights(c.decisions)])
        c.module = manager.run(c.captured.graph_module)
        c.report.rewrites, applied, c.passes = manager.rewrites, manager.applied(), manager.names()
    else:
        c.module, c.report.rewrites, applied = swap_modules(structural_copy(c.work.reference), c.decisions)
    for layer in c.report.layers:
        if layer.action != "kept" and layer.name not in applied:
            why = ("a functional linear needs a traced graph" if c.captured.graph_module is None
                   else "not called as a module or F.linear on the parameter in the traced graph")
            layer.keep(f"condensable but not rewritten: {why}")
    return f"{sum(c.report.rewrites.values())} layer(s) rewritten"


def _exported(c: Compilation) -> Optional[fx.GraphModule]:
    """torch.export's graph of the work model: the one narrowing read (handed over once), else a new one."""
    if c.narrowing is not None and c.narrowing.exported is not None:
        graph, c.narrowing.exported = c.narrowing.exported, None
        return graph
    return exported_graph(c.work.reference, c.inputs)[0] if c.options.has_inputs else None


def fold(c: Compilation) -> Optional[str]:
    if c.captured.graph_module is not None:
        manager = PassManager([FoldBatchNorm()], ran=c.passes)
        c.module = manager.run(c.module)
        c.passes = manager.names()
        c.report.folded = [bn for o in manager.outcomes for bn in o.applied]
    else:       # layers swapped in place: torch.export's graph of the same model says what feeds what
        graph = _exported(c)
        if graph is None:
            return None
        c.report.folded = fold_in_place(c.module, graph.graph)
    if c.report.folded:
        how = "" if c.captured.graph_module is not None else " (pairs read from torch.export's graph)"
        c.report.notes.append(f"{len(c.report.folded)} BatchNorm(s) folded into the condensed convolution before "
                              f"them{how}: {', '.join(c.report.folded)}")
    return f"{len(c.report.folded)} BatchNorm(s) folded"


def at_precision(c: Compilation) -> nn.Module:
    """The compiled module as its calls run it: under autocast where ``precision=`` asks for another dtype."""
    return c.module if c.options.dtype is None else _precision.AtPrecision(c.module, c.options.dtype)


def precision(c: Compilation) -> Optional[str]:
    if c.options.dtype is None:
        return None
    count = _precision.convert_layers(c.module, c.options.dtype)
    c.tolerance = _precision.TOLERANCE
    c.report.notes.append(f"precision {c.options.precision}: the {count} condensed layer(s) hold "
                          f"{str(c.options.dtype).removeprefix('torch.')} values, the rest runs under autocast; "
                          f"outputs validated against the float32 model at {_precision.TOLERANCE:.0e} x max |output|")
    return f"{count} condensed layer(s) in {c.options.precision}, the rest under autocast"


def tune(c: Compilation) -> Optional[str]:
    if not c.options.autotune:
        disable(c.module)
        return "off: sparse kernels everywhere"
    cold = stream_if_large(c.module)
    if cold:
        c.report.notes.append("the model's tensors exceed the last-level cache: sparse-or-dense choices are "
                              "measured with the cache flushed before each call, as the model's other layers leave it")
    if not c.options.has_inputs or c.options.on_engine:
        return None
    autotune(at_precision(c), c.inputs, c.report)
    dense = sum(bool(lay.choice) and "dense op" in lay.choice for lay in c.report.layers)
    return f"{dense} layer(s) run dense at the example inputs" + (" (measured cold)" if cold else "")


def _load_engine(name: str, module: nn.Module, reference: nn.Module, inputs: Call,
                 options: Mapping[str, Any]) -> tuple[nn.Module, Mapping[str, str]]:
    """Export the rewritten model for engine ``name`` and load it, called as ``reference`` is (keywords
    included); also the form each condensed layer got in the file."""
    from sparsecc.runtimes.onnxruntime.writer import write_onnx

    eng = runtimes.engine(name)
    unknown = sorted(set(options) - set(eng.OPTIONS))
    if unknown:
        raise InputError(f"runtime_options {unknown} are not understood by {name}; it takes {list(eng.OPTIONS)}")
    options = dict(options)
    given = options.pop("onnx_path", None)
    folder = None if given else tempfile.mkdtemp(prefix="sparsecc-")
    path = Path(given) if given else Path(folder) / "model.onnx"
    try:
        exported = write_onnx(module, inputs, path, **eng.EXPORT)
        with torch.no_grad():
            outputs = pytree.tree_flatten(inputs(reference))[1]
        runner = eng.load(exported.path, exported.input_names, outputs, example_inputs=tuple(inputs.tensors()),
                          arrangement=Arrangement.of(reference.forward, inputs), **options)
    finally:
        if folder is not None and not eng.KEEPS_FILE:
            shutil.rmtree(folder, ignore_errors=True)
    return runner, exported.forms


def engine(c: Compilation) -> Optional[str]:
    if not c.options.on_engine:
        return None
    from sparsecc.runtimes.onnxruntime.writer import PRECISIONS

    name = c.options.backend
    c.module, forms = _load_engine(name, c.module, c.prepared.user, c.inputs, c.options.runtime_options)
    for layer in c.report.condensed:
        layer.runtime = f"{name} ({forms.get(layer.name, 'dense')})"
    c.report.engine = name
    c.report.notes.append(f"{name} runs the whole exported graph: validated end to end only (its layers "
                          f"are not observable one by one)")
    c.tolerance = TOLERANCE[PRECISIONS[runtimes.engine(name).EXPORT["precision"]]]
    return f"exported to {name}"


def validate(c: Compilation) -> Optional[str]:
    if not (c.options.validate and c.options.has_inputs):
        return None
    validate_into(c.report, c.prepared, at_precision(c), input_sets(c.inputs), c.tolerance, c.work)
    return "; ".join(map(str, c.report.end_to_end))


def _tree_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor: swapping a submodule in it leaves the original (which
    first-call validation still reads its weights from) as it was."""
    new = copy.copy(module)
    new._modules = {k: None if m is None else _tree_copy(m) for k, m in module._modules.items()}
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    return new


def model_shell(c: Compilation) -> Optional[nn.Module]:
    """The user's model class around the condensed layers, for the attributes and methods a captured graph does
    not carry (``num_classes``, ``forward_features``): the work copy with the same condensed modules swapped in
    (shared with the graph, not copied; the tree around them is a copy sharing every tensor) and the folded
    BatchNorms made identities. None where the compiled
    module is already the model itself (module swapping) or a graph by origin."""
    if c.captured is None or c.captured.graph_module is None or c.options.on_engine \
            or isinstance(c.work.reference, fx.GraphModule):
        return None
    shell, _, _ = swap_modules(_tree_copy(c.work.reference), c.decisions)
    for name in c.report.folded:
        shell.set_submodule(name, nn.Identity())
    return shell


#: The stages in order, by name.
STAGES: tuple[tuple[str, Callable[[Compilation], Optional[str]]], ...] = (
    ("masks", masks), ("narrow", narrow_stage), ("analyse", analyse), ("bind", bind), ("capture", capture_stage),
    ("condense", condense), ("fold", fold), ("precision", precision), ("tune", tune), ("engine", engine),
    ("validate", validate))


def run(c: Compilation) -> Compilation:
    """Every stage in order; each outcome lands in the report (created by ``analyse``) as it completes."""
    done: list[StageOutcome] = []
    for name, stage in STAGES:
        start = time.perf_counter()
        summary = stage(c)
        done.append(StageOutcome(name, summary is not None, summary or "skipped", time.perf_counter() - start))
        line = done[-1].summary if len(done[-1].summary) <= 150 else done[-1].summary[:147] + "..."
        progress.info("compile %s: %s (%.1f s)", name, line, done[-1].seconds)
        if c.report is not None:
            c.report.stages, done = c.report.stages + done, []
    return c
