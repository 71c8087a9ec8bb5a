"""Public entry points: `compile`, `inspect`, `validate`, `masked_reference`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from sparsecc.capture.masks import prepare
from sparsecc.compiler import pipeline, precision as _precision
from sparsecc.compiler.precision import TOLERANCE as PRECISION_TOLERANCE
from sparsecc.compiler.compiled import CompiledModel, spec_of
from sparsecc.compiler.validation import Validation, run_validation
from sparsecc.core.errors import InputError
from sparsecc.core.inputs import Arrangement, Call, example_call
from sparsecc.core.report import LayerChange, Report, StageResult
from sparsecc.planning.condense import plan
from sparsecc.runtimes import ENGINES, resolve

log = logging.getLogger("sparsecc")


def _options(example: Call, backend: str, validate: bool, autotune: bool,
             runtime_options: Optional[Mapping[str, Any]], narrow: Optional[bool], model: nn.Module,
             precision: str = "fp32") -> pipeline.Options:
    """The arguments of `compile`, checked."""
    has_inputs = bool(example)
    if narrow and not has_inputs:
        raise InputError("narrow=True checks the narrowed network on the example inputs: pass example_inputs")
    if backend in ENGINES and not has_inputs:
        raise InputError(f"backend={backend!r} exports the model: pass example_inputs")
    if runtime_options and backend not in ENGINES:
        raise InputError(f"runtime_options are for the engines {sorted(ENGINES)}; backend={backend!r} takes none")
    runtime = resolve("reference" if backend in ENGINES else backend)     # an unknown backend fails here
    dtype = _precision.check(precision, model, backend in ENGINES)
    return pipeline.Options(backend, runtime, validate, autotune, has_inputs if narrow is None else narrow,
                            has_inputs, dict(runtime_options or {}), precision, dtype)


def compile(model: nn.Module, example_inputs: Any = None, *, example_kwargs: Optional[Mapping[str, Any]] = None,
            masks: Optional[Mapping[str, Tensor]] = None, backend: str = "auto", validate: bool = True,
            autotune: bool = True, runtime_options: Optional[Mapping[str, Any]] = None,
            narrow: Optional[bool] = None, precision: str = "fp32",
            fuse: Union[bool, Sequence[int]] = False) -> CompiledModel:
    """Condense the sparse layers of ``model`` and return a drop-in callable with a ``report``.

    ``example_inputs`` (a tensor or a tuple) and ``example_kwargs`` (a dict, e.g. ``input_ids=``,
    ``attention_mask=`` for a Hugging Face model) are one call of the model: the compiled model is called the
    same way, and narrowing, tuning and validation run that call. Outputs may be any structure (tuples, dicts,
    ``ModelOutput``, KV caches): validation compares them leaf by leaf and the compiled model returns the same
    types. Attributes and methods of the model (``config``, ``generate``) are reachable on the compiled model and
    run on the condensed layers.

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
    neurons and unused channels from the network itself (`sparsecc.planning.narrow`): producers, BatchNorms and
    consumers get narrower, consumers' biases absorb the constants; the report's notes list widths before and
    after and what was left and why.

    ``precision="bf16"`` runs a float32 model in bfloat16 (`sparsecc.compiler.precision`): condensed layers hold bf16
    values, the rest runs under CPU autocast (AMX where the CPU has it), outputs come back in float32,
    validated against the float32 model at the tolerance the report states. The default ``"fp32"`` runs the
    model in its own dtype.

    ``fuse=True`` (torch's current thread count) or ``fuse=[1, 8]`` (those thread counts) also has inductor
    compile the dense remainder of the graph for the example call (`sparsecc.compiler.fuse`: LayerNorms,
    activations, adds and the layers that run dense by choice fused, weights laid out once), validated against
    your model and kept where it measures faster; inference calls (grad off) like the example at those thread
    counts run it. It pays where the dense rest dominates (bf16 on a CPU with AMX) and costs seconds of compile
    per thread count; the report says what each fused graph measured.
    """
    inputs = example_call(example_inputs, example_kwargs)
    options = _options(inputs, backend, validate, autotune, runtime_options, narrow, model, precision)
    fuse_threads = _fuse_threads(fuse, options)
    c = pipeline.run(pipeline.Compilation(model, masks, inputs, options))
    c.module.requires_grad_(False)    # inference: plain calls build no autograd graph (inputs may still want grads)
    validate_first_call = validate and not options.has_inputs
    compiled = CompiledModel(c.module, c.results, c.prepared if validate_first_call else None,
                             spec_of(inputs) if options.has_inputs else None, pipeline.model_shell(c),
                             keywords=bool(inputs.kwargs), dtype=options.dtype)
    if options.has_inputs:
        compiled.__dict__["_example"] = inputs     # what `save` exports with when given nothing else
        # A captured graph takes its inputs as the example passed them: keyword calls are laid out like it.
        compiled.__dict__["_arrangement"] = Arrangement.of(model.forward, inputs)
    _fuse(compiled, c.prepared.user, fuse_threads, options)
    log.info("%s", c.report.summary())
    return compiled


def _fuse(compiled: CompiledModel, user: nn.Module, counts: tuple[int, ...], options: pipeline.Options) -> None:
    """`CompiledModel.fuse` at each thread count ``fuse=`` asked for; torch's own thread count is restored."""
    threads = torch.get_num_threads()
    tolerance = None if options.dtype is None else PRECISION_TOLERANCE
    try:
        for n in counts:
            torch.set_num_threads(n)
            log.info("%s", compiled.fuse(user, tolerance, options.validate))
    finally:
        torch.set_num_threads(threads)


def _fuse_threads(fuse: Union[bool, Sequence[int]], options: pipeline.Options) -> tuple[int, ...]:
    """The thread counts `compile`'s ``fuse=`` asks for, checked."""
    if fuse is False or fuse is None:
        return ()
    if not options.has_inputs:
        raise InputError("fuse= builds the fused graph for the example call: pass example_inputs")
    if options.on_engine:
        raise InputError(f"fuse= fuses the dense ops around sparsecc's layers; backend={options.backend!r} runs the "
                         f"whole exported model in its own engine: leave fuse off")
    counts = (torch.get_num_threads(),) if fuse is True else tuple(fuse)
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        raise InputError(f"fuse={fuse!r}: pass True (torch's thread count) or thread counts >= 1, e.g. fuse=[1, 2]")
    return tuple(dict.fromkeys(counts))


def inspect(model: nn.Module, example_inputs: Any = None, *, example_kwargs: Optional[Mapping[str, Any]] = None,
            masks: Optional[Mapping[str, Tensor]] = None) -> Report:
    """The per-layer report (structure, bytes, FLOPs) without compiling. With example inputs FLOPs are per
    call; without, per output position (token or pixel)."""
    prepared = prepare(model, masks)
    results = [pipeline.planned(plan(prepared), "reference", prepared)]
    inputs = example_call(example_inputs, example_kwargs)
    if inputs:
        result = run_validation(prepared.reference, prepared.reference, [inputs], prepared.layers)
        results.append(StageResult("positions", f"{len(result.positions)} layer(s) counted", changes=tuple(
            (name, LayerChange(positions=n)) for name, n in result.positions.items())))
    report = dataclasses.replace(Report.built(results), compiled=False)
    return report


def masked_reference(model: nn.Module, masks: Optional[Mapping[str, Tensor]] = None) -> nn.Module:
    """An eval-mode copy of ``model`` with its masks baked into plain weights: what compiled models equal."""
    return prepare(model, masks).reference


def validate(reference_model: nn.Module, compiled_model: nn.Module, inputs: Any,
             kwargs: Optional[Mapping[str, Any]] = None) -> Validation:
    """Compare ``compiled_model`` with ``reference_model`` as the user runs it (hooks and parametrizations live)
    on ``inputs`` (and keyword ``kwargs``), and each condensed layer with its masked weights; returns the result
    (check ``.ok``) without raising."""
    prepared = prepare(reference_model)
    module = compiled_model.module if isinstance(compiled_model, CompiledModel) else compiled_model
    dtype = compiled_model.__dict__.get("_dtype") if isinstance(compiled_model, CompiledModel) else None
    if dtype is not None:        # compiled with precision=: run as its calls run, at its tolerance
        module = _precision.AtPrecision(module, dtype)
    return run_validation(prepared.user, module, [example_call(inputs, kwargs)], prepared.layers,
                          None if dtype is None else _precision.TOLERANCE, weights_from=prepared.reference,
                          rebuilt=prepared.reference, held_in=dtype)
