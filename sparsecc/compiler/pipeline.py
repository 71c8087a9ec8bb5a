"""`sparsecc.compile` as a pipeline of named stages over one `Compilation`:

masks -> narrow -> analyse -> bind -> capture -> condense -> fold -> chain -> layouts -> precision -> tune -> engine
-> validate

Each stage builds on the `Compilation` (the working model, its decisions, its captured graph) and returns a
frozen `StageResult`: a one-line summary (None when it did not apply: no example inputs to narrow with,
nothing to fold), what it learnt per layer and its notes. `run` times each one and appends it to
``Compilation.results``; the report is built from those results (`Report.built`), never written by a stage.
How condensed layers enter the model is chosen once, at capture: rewriting the captured graph with the
`PassManager`'s passes (`GraphRoute`), or swapping modules of a copy when no graph was captured (`SwapRoute`).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from sparsecc import runtimes
from sparsecc.capture.graph import Captured, capture, exported_graph
from sparsecc.capture.masks import Prepared, prepare, structural_copy
from sparsecc.compiler import precision as _precision
from sparsecc.compiler.autotune import autotune, disable, stream_if_large
from sparsecc.compiler.compiled import validation_result
from sparsecc.compiler.validation import input_sets, users_call
from sparsecc.core import reductions
from sparsecc.core.errors import EquivalenceError, InputError
from sparsecc.core.inputs import Arrangement, Call
from sparsecc.core.report import LayerChange, Report, StageResult
from sparsecc.passes.chain import ChainLinears
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
    """The state the stages pass along: the working model and what was decided about it. What the stages
    found goes in ``results``, one frozen `StageResult` each, and nowhere else."""

    model: nn.Module
    masks: Optional[Mapping[str, Any]]
    inputs: Call                  # the example call (empty without example inputs)
    options: Options
    prepared: Optional[Prepared] = None       # the user's model, its masks, the masked reference
    work: Optional[Prepared] = None           # what is condensed: the narrowed copy when narrowing removed channels
    narrowing: Optional[Narrowing] = None
    decisions: dict[str, Decision] = field(default_factory=dict)
    captured: Optional[Captured] = None
    route: Optional["Route"] = None           # how condensed layers enter the model (chosen at capture)
    module: Optional[nn.Module] = None
    tolerance: Optional[float] = None
    passes: tuple[str, ...] = ()              # the graph passes that have run, in order
    folded: tuple[str, ...] = ()              # the BatchNorms folded (the model shell makes them identities)
    results: list[StageResult] = field(default_factory=list)

    @property
    def report(self) -> Report:
        """The report of the stages so far, built from their results."""
        return Report.built(self.results)


def masks(c: Compilation) -> StageResult:
    c.prepared = c.work = prepare(c.model, c.masks)
    sources = sorted({str(layer.source) for layer in c.prepared.layers.values()})
    notes = ("model was in train mode: compiled an eval() copy",) if c.prepared.was_training else ()
    if c.prepared.linearized:
        names = c.prepared.linearized
        notes += (f"{len(names)} transposed-weight linear(s) (transformers Conv1D) analysed and condensed as "
                  f"nn.Linear: {', '.join(names[:4])}" + (", ..." if len(names) > 4 else ""),)
    return StageResult("masks", f"{len(c.prepared.layers)} weights; masks from {', '.join(sources) or 'nothing'}",
                       notes=notes)


def narrow_stage(c: Compilation) -> StageResult:
    if not c.options.narrow:
        return StageResult("narrow", None)
    try:
        n = c.narrowing = narrow(c.prepared, c.inputs)
    except Exception:
        # Narrowing is the first stage to run the model. Where the model itself fails on the example (an input
        # of the wrong width, say), say that rather than show fx's ShapeProp trace.
        with torch.no_grad():
            users_call(c.prepared.user if c.prepared.user is not None else c.prepared.reference, c.inputs)
        raise
    if n.removals:      # else the unchanged copy is dropped: a model's worth of memory
        c.work = Prepared(n.model, n.layers, c.prepared.was_training)
    notes = [f"narrowed {r}" for r in n.removals] or ["narrow: no channel removed"]
    if n.graph != "torch.fx":
        notes.append(f"narrowing read the graph from {n.graph}")
    notes += [f"not narrowed {p}: {why}" for p, why in n.skipped.items()
              if why != "no ablated or unused channels" and _has_ablated(c.prepared, p)]
    return StageResult("narrow", f"{len(n.removals)} producer(s) narrowed, {len(n.skipped)} left (graph from "
                                 f"{n.graph})", narrowed=tuple(n.removals), notes=tuple(notes))


def _has_ablated(prepared: Prepared, module: str) -> bool:
    """Whether a layer (or ``"<model>"``) had neurons that narrowing could have removed: notes name only those."""
    layer = prepared.layers.get(f"{module}.weight")
    return layer is None or not reductions.all_set(reductions.live_rows(layer.mask))


def _elem_bytes(prepared: Prepared) -> int:
    for layer in prepared.layers.values():
        return prepared.reference.get_parameter(layer.fqn).element_size()
    return 4


def planned(decisions: dict[str, Decision], runtime: str, prepared: Prepared) -> StageResult:
    """The analysis as a stage result: a row per layer (`sparsecc.inspect` builds its report from it too)."""
    condensable = sum(d.replacement is not None for d in decisions.values())
    return StageResult("analyse", f"{condensable}/{len(decisions)} layers condensable", runtime=runtime,
                       rows=tuple(layer_report(d, _elem_bytes(prepared)) for d in decisions.values()))


def analyse(c: Compilation) -> StageResult:
    c.decisions = plan(c.work)
    return planned(c.decisions, c.options.runtime, c.work)


def bind(c: Compilation) -> StageResult:
    """Each condensed layer's runtime: the backend's, or the first in preference order that runs its op."""
    changes = []
    for fqn, d in c.decisions.items():
        if d.replacement is None:
            continue
        weight = c.work.reference.get_parameter(fqn)
        d.replacement.runtime, why = runtimes.for_op(c.options.op_backend, d.replacement.op, weight.dtype)
        changes.append((fqn, LayerChange(runtime=d.replacement.runtime,
                                         reason="; ".join(filter(None, [d.reason, why])))))
    used = sorted({d.replacement.runtime for d in c.decisions.values() if d.replacement is not None})
    return StageResult("bind", f"runtimes {', '.join(used) or 'none'}", changes=tuple(changes))


class Route(Protocol):
    """How the condensed layers enter the model: the one place the pipeline depends on whether a graph was
    captured."""

    def condense(self, c: Compilation) -> tuple[Mapping[str, int], set[str], str]:
        """Sets ``c.module``; returns the rewrites per op, the layers rewritten, and why any other would not be."""

    def fold(self, c: Compilation) -> Optional[tuple[list[str], str]]:
        """Folds BatchNorms into the condensed convolutions before them in ``c.module``: the folded ones and how
        they were found; None where it cannot tell."""

    def chain(self, c: Compilation) -> Optional[list[str]]:
        """Chains Linear pairs of ``c.module`` (`sparsecc.passes.chain`): the chained pairs; None where it cannot
        tell what feeds what."""

    def shell(self, c: Compilation) -> Optional[nn.Module]:
        """The user's model class around the condensed layers (see `model_shell`), or None."""


class GraphRoute:
    """The captured fx graph, rewritten by the `PassManager`'s passes."""

    def condense(self, c: Compilation) -> tuple[Mapping[str, int], set[str], str]:
        manager = PassManager([CondenseModules(c.decisions), CondenseFunctionalOps(c.decisions),
                               DropUnusedWeights(c.decisions)])
        c.module = manager.run(c.captured.graph_module)
        c.passes = manager.names()
        return manager.rewrites, manager.applied(), "not called as a module or F.linear on the parameter in the traced graph"

    def fold(self, c: Compilation) -> Optional[tuple[list[str], str]]:
        manager = PassManager([FoldBatchNorm()], ran=c.passes)
        c.module = manager.run(c.module)
        c.passes = manager.names()
        return [bn for o in manager.outcomes for bn in o.applied], ""

    def chain(self, c: Compilation) -> Optional[list[str]]:
        manager = PassManager([ChainLinears()], ran=c.passes)
        c.module = manager.run(c.module)
        c.passes = manager.names()
        return [pair for o in manager.outcomes for pair in o.applied]

    def shell(self, c: Compilation) -> Optional[nn.Module]:
        if c.options.on_engine or isinstance(c.work.reference, fx.GraphModule):
            return None
        shell, _, _ = swap_modules(_tree_copy(c.work.reference), c.decisions)
        for name in c.folded:
            shell.set_submodule(name, nn.Identity())
        return shell


class SwapRoute:
    """No graph: the condensed layers are swapped into a copy of the model, which runs its own forward."""

    def condense(self, c: Compilation) -> tuple[Mapping[str, int], set[str], str]:
        c.module, rewrites, applied = swap_modules(structural_copy(c.work.reference), c.decisions)
        return rewrites, applied, "a functional linear needs a traced graph"

    def fold(self, c: Compilation) -> Optional[tuple[list[str], str]]:
        graph = _exported(c)      # torch.export's graph of the same model says what feeds what
        if graph is None:
            return None
        return fold_in_place(c.module, graph.graph), " (pairs read from torch.export's graph)"

    def chain(self, c: Compilation) -> Optional[list[str]]:
        return None               # the model's own forward calls its layers: nothing to chain them in

    def shell(self, c: Compilation) -> Optional[nn.Module]:
        return None               # the compiled module is the model itself


def capture_stage(c: Compilation) -> StageResult:
    c.captured = capture(c.work.reference, c.inputs if c.options.has_inputs else None)
    c.route = SwapRoute() if c.captured.graph_module is None else GraphRoute()
    return StageResult("capture", c.captured.method + (f" ({c.captured.reason})" if c.captured.reason else ""),
                       capture=(c.captured.method, c.captured.reason if c.captured.graph_module is None else ""))


def condense(c: Compilation) -> StageResult:
    rewrites, applied, why = c.route.condense(c)
    missed = tuple((fqn, LayerChange(kept=f"condensable but not rewritten: {why}")) for fqn, d in c.decisions.items()
                   if d.replacement is not None and fqn not in applied)
    return StageResult("condense", f"{sum(rewrites.values())} layer(s) rewritten", changes=missed,
                       rewrites=tuple(sorted(rewrites.items())))


def _exported(c: Compilation) -> Optional[fx.GraphModule]:
    """torch.export's graph of the work model: the one narrowing read (handed over once), else a new one."""
    if c.narrowing is not None and c.narrowing.exported is not None:
        graph, c.narrowing.exported = c.narrowing.exported, None
        return graph
    return exported_graph(c.work.reference, c.inputs)[0] if c.options.has_inputs else None


def fold(c: Compilation) -> StageResult:
    found = c.route.fold(c)
    if found is None:
        return StageResult("fold", None)
    folded, how = found
    c.folded = tuple(folded)
    notes = (f"{len(folded)} BatchNorm(s) folded into the condensed convolution before them{how}: "
             f"{', '.join(folded)}",) if folded else ()
    return StageResult("fold", f"{len(folded)} BatchNorm(s) folded", folded=c.folded, notes=notes)


def chain(c: Compilation) -> StageResult:
    pairs = None if c.options.on_engine else c.route.chain(c)
    if pairs is None:
        return StageResult("chain", None)
    notes = (f"{len(pairs)} Linear pair(s) chained (the intermediate stays in the runtime's layout where both "
             f"layers run its many-token kernel): {', '.join(pairs)}",) if pairs else ()
    return StageResult("chain", f"{len(pairs)} Linear pair(s) chained", notes=notes)


def layouts(c: Compilation) -> StageResult:
    """Dense modules the model keeps that have a faster exact form here (`sparsecc.runtimes.dense.MEASURED`)."""
    if c.options.on_engine or not c.options.autotune:     # engines export the model; untuned runs measure nothing
        return StageResult("layouts", None)
    from sparsecc.runtimes.dense import measure_layouts

    swapped = measure_layouts(c.module)
    if not swapped:
        return StageResult("layouts", "nothing to measure")
    note = (f"{len(swapped)} max pool(s) run the layout measured fastest per input shape (torch's, or through a "
            f"channels-last copy; the same values): {', '.join(swapped[:4])}" + (", ..." if len(swapped) > 4 else ""))
    return StageResult("layouts", f"{len(swapped)} pool(s) in their measured layout", notes=(note,))


def at_precision(c: Compilation) -> nn.Module:
    """The compiled module as its calls run it: under autocast where ``precision=`` asks for another dtype."""
    return c.module if c.options.dtype is None else _precision.AtPrecision(c.module, c.options.dtype)


def precision(c: Compilation) -> StageResult:
    if c.options.dtype is None:
        return StageResult("precision", None)
    count = _precision.convert_layers(c.module, c.options.dtype)
    dense = _precision.convert_dense(c.module, c.options.dtype)
    c.tolerance = _precision.TOLERANCE
    notes = (f"precision {c.options.precision}: the {count} condensed layer(s) hold "
             f"{str(c.options.dtype).removeprefix('torch.')} values ({dense} dense Linear / convolution(s) too), the "
             f"rest runs under autocast; outputs validated against the float32 model at {_precision.TOLERANCE:.0e} "
             f"x max |output|",)
    slow = _precision.slow_note(c.options.precision)
    if slow is not None:
        logging.getLogger("sparsecc").warning("sparsecc: %s", slow)
        notes += (slow,)
    if isinstance(c.module, fx.GraphModule) and _precision.convolutional(c.module):
        _precision.channels_last(c.module)
        notes += (f"precision {c.options.precision}, a convolutional network: 4-D inputs run in channels-last memory "
                  f"(oneDNN's own layout for {c.options.precision} convolutions), outputs come back in torch's",)
    return StageResult("precision", f"{count} condensed layer(s) in {c.options.precision}, the rest under autocast",
                       notes=notes)


def tune(c: Compilation) -> StageResult:
    if not c.options.autotune:
        disable(c.module)
        return StageResult("tune", "off: sparse kernels everywhere")
    cold = stream_if_large(c.module)
    notes = ("the model's tensors exceed the last-level cache: sparse-or-dense choices are measured with the cache "
             "flushed before each call, as the model's other layers leave it",) if cold else ()
    if not c.options.has_inputs or c.options.on_engine:
        return StageResult("tune", None, notes=notes)
    changes, whole = autotune(at_precision(c), c.inputs)
    dense = sum(bool(change.runs_dense) for _, change in changes)
    return StageResult("tune", f"{dense} layer(s) run dense at the example inputs" + (" (measured cold)" if cold else ""),
                       changes=changes, notes=notes + ((whole,) if whole else ()))


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


def engine(c: Compilation) -> StageResult:
    if not c.options.on_engine:
        return StageResult("engine", None)
    from sparsecc.runtimes.onnxruntime.writer import file_tolerance

    name = c.options.backend
    c.module, forms = _load_engine(name, c.module, c.prepared.user, c.inputs, c.options.runtime_options)
    changes = tuple((layer.name, LayerChange(runtime=f"{name} ({forms.get(layer.name, 'dense')})"))
                    for layer in c.report.condensed)
    c.tolerance = file_tolerance(runtimes.engine(name).EXPORT["precision"])
    return StageResult("engine", f"exported to {name}", engine=name, changes=changes,
                       notes=(f"{name} runs the whole exported graph: validated end to end only (its layers are "
                              f"not observable one by one)",))


def validate(c: Compilation) -> StageResult:
    if not (c.options.validate and c.options.has_inputs):
        return StageResult("validate", None)
    result, check = validation_result(c.prepared, at_precision(c), input_sets(c.inputs), c.tolerance, c.work,
                                      held_in=c.options.dtype)
    if not check.ok:
        raise EquivalenceError(check.message(), Report.built([*c.results, result]))
    return result


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
    BatchNorms made identities. None where the compiled module is already the model itself (module swapping),
    an engine, or a graph by origin."""
    return c.route.shell(c) if c.route is not None else None


#: The stages in order, by name.
STAGES: tuple[tuple[str, Callable[[Compilation], StageResult]], ...] = (
    ("masks", masks), ("narrow", narrow_stage), ("analyse", analyse), ("bind", bind), ("capture", capture_stage),
    ("condense", condense), ("fold", fold), ("chain", chain), ("layouts", layouts),
    ("precision", precision), ("tune", tune),
    ("engine", engine), ("validate", validate))


def run(c: Compilation) -> Compilation:
    """Every stage in order, each result timed and appended to ``c.results`` as it completes."""
    for name, stage in STAGES:
        start = time.perf_counter()
        result = replace(stage(c), seconds=time.perf_counter() - start)
        assert result.stage == name, (result.stage, name)
        c.results.append(result)
        line = result.outcome().summary
        line = line if len(line) <= 150 else line[:147] + "..."
        progress.info("compile %s: %s (%.1f s)", name, line, result.seconds)
    return c
