"""`CompiledModel`, what `sparsecc.compile` returns: the rewritten module, its report, and the checks every call
runs (inputs against what was compiled, non-finite inputs in the dense semantics, first-call validation when
compile had no example inputs)."""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import threading
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.capture.masks import Prepared
from sparsecc.compiler import autotune, fuse as _fuse
from sparsecc.compiler.precision import TOLERANCE as PRECISION_TOLERANCE, AtPrecision, call as precision_call
from sparsecc.compiler.validation import Validation, input_sets, run_validation
from sparsecc.core.errors import EquivalenceError, InputError
from sparsecc.core.inputs import Call
from sparsecc.core.layers import CondensedLayer, dense_semantics, in_dense_semantics
from sparsecc.core.report import LayerChange, Report, StageResult
from sparsecc.runtimes import tuning

InputSpec = tuple[tuple[torch.dtype, torch.Size], ...]
#: One whole-model check at a time in this process (`CompiledModel._check_whole_model`): it switches layers'
#: routes while it times them, and a second check in another thread would time a mixture.
_CHECKING = threading.Lock()


__all__ = ["CompiledModel", "spec_of", "validation_result"]


def spec_of(inputs: Any) -> InputSpec:
    """Dtype and per-sample shape of every tensor in ``inputs`` (a `Call` or a pytree): what a compiled graph
    accepts (any batch)."""
    tree = inputs.tree if isinstance(inputs, Call) else inputs
    return tuple((t.dtype, t.shape[1:]) for t in pytree.tree_leaves(tree) if isinstance(t, Tensor))


class CompiledModel(nn.Module):
    """The rewritten model. Calls of a captured graph check inputs against what was compiled (free batch
    dimension); a model whose layers were swapped in place runs its own forward, so it takes any call its
    class takes (other keywords, a KV cache). Without example inputs at compile time, the first call fixes
    the inputs and is validated against the reference.

    Like ``torch.compile``'s wrapper, it forwards what it does not have to the model it wraps: the user's
    model class's attributes and methods (``config``, ``generate``) run on the condensed layers."""

    def __init__(self, module: nn.Module, results: Sequence[StageResult], pending: Optional[Prepared],
                 spec: Optional[InputSpec], shell: Optional[nn.Module] = None, keywords: bool = False,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.module = module
        self.__dict__["_results"] = tuple(results)    # the compile stages' results; later ones appended
        self.__dict__["_report"] = None
        self._pending = pending     # what the first call is validated against, when compile had no inputs
        self._spec = spec
        # The model's class around the same condensed layers, when ``module`` is a graph: where attributes and
        # methods the graph lacks are found. Not a submodule: its tensors are the graph's, listed once.
        self.__dict__["_shell"] = shell
        self._keywords = keywords   # the spec came from a call with keyword inputs (no positional example)
        self._dtype = dtype         # the dtype ``precision=`` runs the model in (None: its own)
        # Fused graphs (`fuse`) by (threads, input shapes and strides): inductor's code, not pickled.
        self.__dict__["_fused"] = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_fused"] = {}
        return state

    @property
    def report(self) -> Report:
        """What sparsecc found and did, built from the compile stages' results and any added since (first-call
        validation, `record_choices`)."""
        if self.__dict__["_report"] is None:
            self.__dict__["_report"] = Report.built(self.__dict__["_results"])
        return self.__dict__["_report"]

    def add_result(self, result: StageResult) -> None:
        """Append a stage's result (the report is rebuilt on its next read)."""
        self.__dict__["_results"] += (result,)
        self.__dict__["_report"] = None

    def record_choices(self) -> None:
        """Add the sparse-or-dense choices the layers have made so far (every token count and thread count
        called since compile) to the report."""
        from sparsecc.compiler.autotune import choices

        made = choices(self.module)
        self.add_result(StageResult("choices", f"{len(made)} layer(s) chose", changes=made))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in ("module", "_pending", "_spec", "_shell", "_keywords", "_dtype"):
                raise
            module = super().__getattr__("module")
            shell = self.__dict__.get("_shell")
            found = getattr(module, name) if shell is None or hasattr(module, name) else getattr(shell, name)
            dtype = self.__dict__.get("_dtype")
            if dtype is not None and inspect.ismethod(found):
                # The model's own methods (Hugging Face's ``generate``) call its forward themselves: at
                # ``precision=`` they run under its autocast too, outputs in the model's dtype.
                return functools.wraps(found)(functools.partial(precision_call, found, dtype))
            return found

    @property
    def _strict(self) -> bool:
        """Whether calls must match the compiled inputs: a graph was captured for them."""
        return isinstance(self.module, torch.fx.GraphModule)

    def _check_inputs(self, call: Call) -> Sequence[Tensor]:
        """Raise `InputError` for inputs the compiled model does not take; returns the tensor inputs."""
        spec = self.__dict__["_spec"]
        # The common case without pytree (this runs on every call): tensors by position, then by keyword in the
        # order pytree flattens ``call.tree`` (a dict's insertion order, laid out like the example).
        flat = (*call.args, *call.kwargs.values()) if call.kwargs else call.args
        if spec is not None and len(flat) == len(spec):
            for t, (dt, shape) in zip(flat, spec):
                if type(t) is not Tensor or t.dtype != dt or t.shape[1:] != shape or not t.is_cpu:
                    break
            else:
                return list(flat)
        inputs = call.tree
        leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
        self._check_device(leaves)
        got = spec_of(inputs)
        if spec is None:
            self._spec, self._keywords = got, bool(call.kwargs)
            return leaves
        if not self._strict:
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

    def example_call(self) -> Optional[Call]:
        """The call compiled for (or first made): the example inputs, keywords included; else zero inputs of
        batch 1 in the compiled shapes; None before any."""
        example = self.__dict__.get("_example")
        if example is not None:
            return example
        inputs = self.example_inputs()
        return None if inputs is None else Call(inputs)

    def example_inputs(self) -> Optional[tuple[Tensor, ...]]:
        """Zero inputs of batch 1 in the shapes and dtypes compiled for (None before the first call fixed them, or
        when they were keyword inputs)."""
        if self._spec is None or self._keywords:
            return None
        return tuple(torch.zeros(1, *shape, dtype=dtype) for dtype, shape in self._spec)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Runs on every call, where a batch-1 layer takes tens of microseconds: attributes are read from the
        # instance and module dicts (nn.Module's and our own __getattr__ cost about a microsecond each).
        state = self.__dict__
        module = self._modules["module"]
        if torch.compiler.is_compiling():      # torch.export / dynamo trace the module: no data checks
            return precision_call(module, state.get("_dtype"), *args, **kwargs)
        arrangement = state.get("_arrangement")
        if arrangement is not None and (kwargs or len(args) != len(arrangement.positional)) and self._strict:
            # keywords in any order or by position, checked against the example: laid out like it
            call = arrangement.arrange(args, kwargs)
            args, kwargs = call.args, call.kwargs
        call = Call(args, kwargs)
        tensors = self._check_inputs(call)
        settled = tuning.routes_made()
        # A sum is finite only if every element is (or it overflowed: then dense semantics, still exact).
        finite = True
        for t in tensors:
            if t.is_floating_point() and not math.isfinite(t.sum()):
                finite = False
                break
        dtype = state.get("_dtype")
        if self._pending is not None:
            self.__dict__["_example"] = call
            result, check = validation_result(
                self._pending, self.module if dtype is None else AtPrecision(self.module, dtype), input_sets(call),
                None if dtype is None else PRECISION_TOLERANCE, held_in=dtype)
            self.add_result(replace(result, stage="first call"))
            if not check.ok:        # the next call validates again
                raise EquivalenceError(check.message(), self.report)
            self._pending = None
        if not finite:
            with dense_semantics():
                return precision_call(nn.Module.__call__, dtype, module, *args, **kwargs)
        fused = state.get("_fused")
        if fused and not torch.is_grad_enabled() and not in_dense_semantics():
            hit = fused.get((torch.get_num_threads(), _fuse.key(call, tensors)))
            if hit is not None:
                return hit(call, tensors, dtype)
        # nn.Module's call (hooks included) without GraphModule's traceback wrapper: ~2 us of a batch-1 call.
        out = precision_call(nn.Module.__call__, dtype, module, *args, **kwargs)
        if tuning.routes_made() != settled:      # this call settled choices: check them on the whole model
            self._check_whole_model(call, settled)
        return out

    def _check_whole_model(self, call: Call, since: int) -> None:
        """A call at another token count or thread count than compile's settles its layers' choices one layer at
        a time; like compile's, they are then checked on the whole model (`autotune.never_slower`: the call run
        again with them and with those layers dense, the faster kept) and the report gets the outcome. Only
        calls whose every input is a tensor: running a call again must change nothing (a KV cache would
        grow)."""
        if not all(type(v) is Tensor for v in (*call.args, *call.kwargs.values())):
            return
        lock = _CHECKING
        if not lock.acquire(blocking=False):        # another thread is checking: layers' routes are in flux
            return
        try:
            dtype = self.__dict__.get("_dtype")
            shape = ", ".join(str(tuple(v.shape)) for v in (*call.args, *call.kwargs.values()))
            note = autotune.never_slower(self.module if dtype is None else AtPrecision(self.module, dtype), call,
                                         since, f"a call on {shape}")
        finally:
            lock.release()
        if note:
            self.add_result(StageResult("whole model", note, notes=(note,)))

    def fuse(self, against: nn.Module, tolerance: Optional[float], validate: bool = True) -> str:
        """Fuse the dense remainder for the example call at torch's current thread count
        (`sparsecc.compiler.fuse`; `compile(fuse=...)` calls this for each thread count it is given): inductor
        compiles the graph (or, for a model whose layers were swapped in place, torch.compile compiles the
        model) with the layers that run dense by choice as torch's op, the fused graph is validated against
        ``against`` (the user's model as run) at ``tolerance``, and later calls like the example (same input
        shapes and strides, this thread count, grad off, finite inputs) run it where it measured `FUSE_MARGIN`
        faster than the eager graph. Returns the note the report gets."""
        threads, dtype = torch.get_num_threads(), self.__dict__.get("_dtype")
        where = f"{threads} thread(s)"
        example = self.__dict__.get("_example")
        if example is None or not any(isinstance(m, CondensedLayer) for m in self.module.modules()):
            return self._fuse_note(f"fuse at {where}: not fused: no example inputs or no condensed layers (the "
                                   f"model runs on an engine)")
        arrangement = self.__dict__.get("_arrangement")
        call = arrangement.arrange(example.args, example.kwargs) if arrangement is not None and self._strict \
            else example
        flat = (*call.args, *call.kwargs.values())
        try:
            run, order, counts, out = self._fused_graph(call, flat, dtype, threads)
        except _fuse.FuseError as exc:
            return self._fuse_note(f"fuse at {where}: not fused: {exc}")
        entry = _fuse.Fused(run, order, threads, *counts, spec=pytree.tree_structure(out))
        outcome = self._keep_fused(entry, (threads, _fuse.key(call, flat)), against, tolerance, validate)
        return self._fuse_note(f"fuse at {where}: {outcome}")

    def _fused_graph(self, call: Call, flat: Sequence[Any], dtype: Optional[torch.dtype], threads: int) -> tuple:
        """The fused graph for ``call`` (`fuse.fused_graph` for a captured graph, `fuse.module_graph` for layers
        swapped in place), its input order, (dense, sparse, eager calls) and the eager output."""
        example = self.__dict__["_example"]
        if self._strict:
            order, defaults = _fuse.graph_inputs(self.module, call, flat)
            with torch.no_grad():
                out = example(self)     # the layers' choices at this thread count, checked on the whole model
            run, *counts = _fuse.fused_graph(self.module, [flat[i] for i in order], dtype, threads, defaults)
            return run, order, counts, out
        if not all(type(v) is Tensor for v in flat):
            raise _fuse.FuseError("the example call passes values other than tensors (fusing takes calls of tensors "
                                  "only)")
        # the layers' choices at this thread count, and each layer's output for its `EagerCall`
        outputs, out = _fuse.layer_outputs(self.module, lambda: example(self))
        run, *counts = _fuse.module_graph(self.module, call, dtype, threads, outputs)
        return run, None, counts, out

    def _keep_fused(self, entry: _fuse.Fused, slot: tuple, against: nn.Module, tolerance: Optional[float],
                    validate: bool) -> str:
        """Serve ``slot``'s calls with ``entry`` where it validates and measures faster than the eager graph;
        what happened, for the report."""
        from sparsecc.core import timing

        example, dtype = self.__dict__["_example"], self.__dict__.get("_dtype")
        fused = self.__dict__["_fused"]
        fused[slot] = entry
        checked = "not validated (validate=False)"

        def eager() -> None:
            fused.pop(slot)
            try:
                example(self)
            finally:
                fused[slot] = entry

        try:
            if validate:
                sets = input_sets(example)
                before = entry.calls
                check = run_validation(against, self, sets, None, tolerance, held_in=dtype, layer_checks=False)
                if not check.ok or entry.calls - before != len(sets):
                    del fused[slot]
                    return f"not kept: {check.message() if not check.ok else 'the validation calls did not reach it'}"
                checked = "validated: " + "; ".join(map(str, check.end_to_end))
            times = timing.medians({"eager": eager, "fused": lambda: example(self)}, runs=5, warmup=1,
                                   budget_s=1.0)
        except Exception as exc:  # noqa: BLE001 - a fused graph that fails to run is dropped, with the reason
            fused.pop(slot, None)
            return f"not kept: it failed to run ({type(exc).__name__}: {str(exc)[:300]})"
        kept = times["fused"] * (1 + _fuse.FUSE_MARGIN) < times["eager"]
        if not kept:
            del fused[slot]
        chains = f" ({entry.eager.chains} chain(s) of two)" if entry.eager.chains else ""
        layers = f"{entry.dense} layer(s) dense by choice as torch's op, {entry.sparse} sparse kernel(s) run " \
                 f"eagerly{chains}"
        outcome = "kept for calls like the example" if kept else f"not kept (not {_fuse.FUSE_MARGIN:.0%} faster)"
        return (f"{times['fused'] * 1e3:,.2f} ms fused ({layers}) vs {times['eager'] * 1e3:,.2f} ms eager: "
                f"{outcome}; {checked}")

    def _fuse_note(self, note: str) -> str:
        self.add_result(StageResult("fuse", note, notes=(note,)))
        return note


def validation_result(prepared: Prepared, module: nn.Module, input_sets: Sequence[tuple],
                      tolerance: Optional[float] = None, work: Optional[Prepared] = None,
                      held_in: Optional[torch.dtype] = None) -> tuple[StageResult, Validation]:
    """Validate ``module`` against the user's model as run, its layers against ``work``'s weights (the
    narrowed copy, when there is one): the check, and the stage result the report takes from it. ``held_in``:
    the ``precision=`` dtype (`run_validation`)."""
    work = work or prepared
    check = run_validation(prepared.user, module, input_sets, work.layers, tolerance, work.reference,
                           rebuilt=prepared.reference, held_in=held_in)
    changes = {fqn: LayerChange(error=stat) for fqn, stat in check.layers.items()}
    for fqn, n in check.positions.items():
        changes[fqn] = replace(changes.get(fqn, LayerChange()), positions=n)
    summary = "; ".join(map(str, check.end_to_end))
    return StageResult("validate", summary, changes=tuple(changes.items()), end_to_end=tuple(check.end_to_end)), check
