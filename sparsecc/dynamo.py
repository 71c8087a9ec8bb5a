"""``torch.compile(model, backend="sparsecc")``: sparsecc's passes on the graph dynamo captures.

Dynamo hands a backend an FX graph in which the module's parameters and buffers are placeholders (inlined
``nn.Module``s). The backend turns that graph back into a module sparsecc can compile:

1. *lift* — placeholders that dynamo sourced from the module (parameters, buffers, tensor attributes)
   become constants of a new root (their values are captured now: like inductor's freezing, weights are constants
   of the compiled graph; recompile after changing them);
2. *fold* — nodes computed from those constants alone are evaluated once (a prune hook's
   ``weight_orig * weight_mask``, a parametrization), so masks show up as exact zeros;
3. *modularise* — functional ``linear`` / ``conv2d`` calls on a constant weight become ``nn.Linear`` /
   ``nn.Conv2d`` modules named after the source module (``encoder.layers.0.mlp.0``).

Then `sparsecc.compile` runs as usual (analysis, rewrite, validation against the graph itself) and the
result goes to inductor for the dense remainder, the condensed layers staying opaque custom ops, or runs
eagerly (``backend=sparsecc.dynamo.backend_with(inductor=False)``).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.experimental.symbolic_shapes import optimization_hint

from sparsecc.core.report import Report

log = logging.getLogger("sparsecc")

_LINEAR = (torch._C._nn.linear, F.linear)
_CONV2D = (torch.conv2d, F.conv2d)
#: The local a placeholder's source starts from: ``self`` (or whatever a forward names its first argument),
#: ``fn`` for a compiled module, ``___stack5`` after a graph break (the resumed frame's stack).
_LOCAL = re.compile(r"^L\['(?:___stack(\d+)|[^']+)'\]\.")
_MODULE_PATH = re.compile(r"_modules\['([^']+)'\]")
_ATTR = re.compile(r"(?:_(?:parameters|buffers)\['([^']+)'\]|\.(\w+))$")
#: Reports of the graphs compiled in this process, newest last (``last_report()``).
REPORTS: list[Report] = []
_KEEP_REPORTS = 32


def last_report() -> Optional[Report]:
    """The report of the last graph `torch.compile(backend="sparsecc")` compiled in this process."""
    return REPORTS[-1] if REPORTS else None


def _is_module_state(source: Any) -> bool:
    """Whether dynamo reached this tensor through an ``nn.Module`` (its parameters, buffers or plain tensor
    attributes, such as the weight a prune hook sets on a submodule whose forward never runs), not an argument."""
    guard = getattr(source, "guard_source", None)
    return guard is not None and any(getattr(guard, test)() for test in
                                     ("is_specialized_nn_module", "is_unspecialized_nn_module", "is_fsdp_module")
                                     if hasattr(guard, test))


def _state_name(node: fx.Node) -> Optional[str]:
    """``"encoder.layers.0.mlp.0.weight"`` for a placeholder dynamo sourced from module state, else None."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    state = _LOCAL.search(name) if isinstance(name, str) and _is_module_state(source) else None
    if state is None:
        return None
    attr = _ATTR.search(name)
    stack = [f"stack{state.group(1)}"] if state.group(1) else []
    return ".".join([*stack, *_MODULE_PATH.findall(name), (attr.group(1) or attr.group(2)) if attr else node.name])


CONSTANTS = "constants"    # where lifted state lives in the new root, apart from the modules built later


def _set_tensor(root: nn.Module, dotted: str, value: Tensor) -> str:
    """Register ``value`` at ``constants.<dotted>`` (creating parents), under a unique name; returns it."""
    parent, _, attr = f"{CONSTANTS}.{dotted}".rpartition(".")
    owner = root
    for part in parent.split("."):
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    name, n = attr, 1
    while hasattr(owner, name):
        name, n = f"{attr}_{n}", n + 1
    # Parameters, not buffers: fx's tracer proxies parameters, so sparsecc can trace this graph again.
    owner.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
    return f"{parent}.{name}"


def _exists(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _impure(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.is_impure() or "rand" in name or name.endswith("_")     # random or in place


def state_names(gm: fx.GraphModule) -> dict[int, str]:
    """Input position -> dotted name of each placeholder dynamo sourced from module state. Read when the backend
    is called: dynamo drops the placeholders' source metadata after that, and a module state first seen at a
    later call is lifted with these names."""
    placeholders = (n for n in gm.graph.nodes if n.op == "placeholder")
    return {i: name for i, node in enumerate(placeholders) if (name := _state_name(node)) is not None}


def lift(gm: fx.GraphModule, example_inputs: Sequence[Any],
         states: Optional[dict[int, str]] = None) -> tuple[fx.GraphModule, list[int]]:
    """The graph with module state (``states``, by default read from ``gm``) as constants of a new root, and the
    positions of the real inputs."""
    states = state_names(gm) if states is None else states
    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    constants: dict[fx.Node, Tensor] = {}
    inputs: list[int] = []
    position = -1
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            position += 1
            state = states.get(position)
            if state is not None and isinstance(example_inputs[position], Tensor):
                env[node] = graph.get_attr(_set_tensor(root, state, example_inputs[position]))
                constants[env[node]] = example_inputs[position]
            else:
                inputs.append(position)
                env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        producers = node.all_input_nodes
        if node.op in ("call_function", "call_method") and producers \
                and all(env[p] in constants for p in producers) and not _impure(node):
            # Computed from constants alone (e.g. weight_orig * weight_mask): evaluate it now.
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: constants[env[n]])
            with torch.no_grad():
                value = (getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method"
                         else node.target(*args, **kwargs))
            if isinstance(value, Tensor):
                # Named after the first constant it reads, so it stays under that module's path.
                env[node] = graph.get_attr(_set_tensor(root, env[producers[0]].target.split(".", 1)[1], value))
                constants[env[node]] = value
                continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    lifted = fx.GraphModule(root.eval(), graph)
    _modularise(lifted, constants)
    return lifted, inputs


def _call_args(node: fx.Node) -> dict[str, Any]:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    return dict(zip(names, node.args)) | dict(node.kwargs)


def _layer(node: fx.Node, call: dict[str, Any], weight: Tensor, bias: Optional[Tensor]) -> nn.Module:
    if node.target in _LINEAR:
        module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        groups = call.get("groups", 1)
        module = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                           stride=call.get("stride", 1), padding=call.get("padding", 0),
                           dilation=call.get("dilation", 1), groups=groups, bias=bias is not None)
    module.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return module.eval()


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
             "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")
_MHA_CALL = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _attention(lifted: fx.GraphModule, node: fx.Node, constants: dict[fx.Node, Tensor]) -> None:
    """``F.multi_head_attention_forward`` on constant projections -> call_module on an equivalent
    ``nn.MultiheadAttention`` (sequence first, as the functional form takes it), which sparsecc traces."""
    call = dict(zip(_MHA_ARGS, node.args)) | dict(node.kwargs)
    weights = [constants.get(call.get(n)) if isinstance(call.get(n), fx.Node) else None
               for n in ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")]
    plain = (call.get("bias_k") is None and call.get("bias_v") is None and not call.get("add_zero_attn")
             and not call.get("use_separate_proj_weight") and call.get("static_k") is None
             and call.get("static_v") is None and not call.get("training", False))
    if not plain or weights[0] is None or weights[2] is None:
        return
    in_w, in_b, out_w, out_b = weights
    mha = nn.MultiheadAttention(in_w.shape[1], call["num_heads"], bias=in_b is not None)
    mha.in_proj_weight = nn.Parameter(in_w.detach(), requires_grad=False)
    mha.in_proj_bias = None if in_b is None else nn.Parameter(in_b.detach(), requires_grad=False)
    mha.out_proj.weight = nn.Parameter(out_w.detach(), requires_grad=False)
    mha.out_proj.bias = None if out_b is None else nn.Parameter(out_b.detach(), requires_grad=False)
    path = _unique(lifted, call["in_proj_weight"].target.split(".", 1)[1].rpartition(".")[0] or "attention")
    lifted.add_submodule(path, mha.eval())
    with lifted.graph.inserting_before(node):
        replacement = lifted.graph.call_module(path, (call["query"], call["key"], call["value"]),
                                               {k: call[k] for k in _MHA_CALL if k in call})
    node.replace_all_uses_with(replacement)
    lifted.graph.erase_node(node)


def _unique(root: nn.Module, path: str) -> str:
    candidate, n = path, 1
    while _exists(root, candidate):
        candidate, n = f"{path}_{n}", n + 1
    return candidate


def _modularise(lifted: fx.GraphModule, constants: dict[fx.Node, Tensor]) -> None:
    """Functional linear / conv2d on a constant weight -> call_module on an nn.Linear / nn.Conv2d; functional
    attention -> nn.MultiheadAttention."""
    for node in list(lifted.graph.nodes):
        if node.op == "call_function" and node.target is F.multi_head_attention_forward:
            _attention(lifted, node, constants)
            continue
        if node.op != "call_function" or node.target not in _LINEAR + _CONV2D:
            continue
        call = _call_args(node)
        weight_node, bias_node = call.get("weight"), call.get("bias")
        weight = constants.get(weight_node) if isinstance(weight_node, fx.Node) else None
        bias = constants.get(bias_node) if isinstance(bias_node, fx.Node) else None
        if weight is None or (bias_node is not None and bias is None) or weight.dim() not in (2, 4):
            continue
        # The module the weight came from: "<module>.weight" and prune's "<module>.weight_orig*" name the
        # module itself; another tensor (attention's in_proj_weight) names a child of that module.
        parent, _, attr = weight_node.target.split(".", 1)[1].rpartition(".")
        path = _unique(lifted, parent if parent and attr.startswith("weight")
                       else ".".join(p for p in (parent, attr) if p))
        lifted.add_submodule(path, _layer(node, call, weight, bias))
        with lifted.graph.inserting_before(node):
            replacement = lifted.graph.call_module(path, (call["input"],))
        node.replace_all_uses_with(replacement)
        lifted.graph.erase_node(node)
    lifted.graph.eliminate_dead_code()
    lifted.delete_all_unused_submodules()
    lifted.recompile()


#: Compiled artifacts kept per graph (one per module state seen; the oldest is dropped beyond this).
_KEEP_STATES = 8


def _state_key(args: Sequence[Any], positions: set[int]) -> tuple:
    """Which module state a call carries: each state tensor's address and version."""
    return tuple((t.data_ptr(), t._version) for i, t in enumerate(args) if i not in positions and isinstance(t, Tensor))


def backend_with(*, inductor: bool = True, runtime: str = "auto", validate: bool = True) -> Callable:
    """A dynamo backend: sparsecc on the captured graph, then inductor (or eager) for the rest.

    Module state is frozen into the compiled graph, but dynamo hands one graph to every instance of a class
    (parameters are graph inputs, guarded on shape, not identity) and to the same instance after an in-place
    weight update. So the graph is compiled per module state: each call's state tensors (storage, offset,
    version) select the compiled artifact, and a new state compiles (and validates) another one."""

    def sparsecc_backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        artifacts: dict[tuple, tuple[Callable, list[int]]] = {}
        states = state_names(gm)

        def build(args: Sequence[Any]) -> tuple[Callable, list[int]]:
            import sparsecc

            lifted, positions = lift(gm, args, states)
            inputs = [args[i] for i in positions]
            # A dynamic graph takes its sizes as SymInt inputs: sparsecc compiles and validates on their hints.
            concrete = tuple(optimization_hint(v) if isinstance(v, torch.SymInt) else v for v in inputs)
            compiled = sparsecc.compile(lifted, concrete, backend=runtime, validate=validate)
            report = compiled.report
            REPORTS.append(report)
            del REPORTS[:-_KEEP_REPORTS]
            if not report.condensed:
                log.info("sparsecc backend: nothing to condense in a graph of %d analysed layer(s)",
                         len(report.layers))
            else:
                log.info("%s", report.summary())
            run: Callable = compiled.module
            if inductor:
                from torch._inductor.compile_fx import compile_fx

                run = compile_fx(compiled.module, inputs)
            return run, positions

        first, positions = build(example_inputs)
        real = set(positions)
        artifacts[_state_key(example_inputs, real)] = (first, positions)

        def call(*args: Any) -> Any:
            key = _state_key(args, real)
            found = artifacts.get(key)
            if found is None:
                found = artifacts[key] = build(args)
                while len(artifacts) > _KEEP_STATES:
                    del artifacts[next(iter(artifacts))]
            run, where = found
            return run(*[args[i] for i in where])

        return call

    return sparsecc_backend


#: The backend registered as ``"sparsecc"`` (pyproject entry point ``torch_dynamo_backends``).
backend = backend_with()
