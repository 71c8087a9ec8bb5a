"""Fusing the dense remainder of a compiled graph: ``compile(..., fuse=True)`` and `CompiledModel.fuse`.

Once a layer runs dense by choice, what is left between a model's GEMMs is torch's eager ops: LayerNorm, GELU,
residual adds, casts, each a dispatch and an allocation. On a CPU with AMX that rest outweighs the GEMMs: ViT-B/16
at ``precision="bf16"``, 2 threads (Xeon, every Linear dense by choice there), ran 45 ms against OpenVINO's 36,
whose GEMMs took longer than ours (30 vs 23 ms) but whose rest took 6 ms against our 22. inductor compiles that
rest into fused C++ loops, and with its freezing lays out each dense weight once for oneDNN and folds the
bias and activation into the GEMM.

So `fused_graph` hands inductor a copy of the compiled graph in which every condensed layer that runs dense by
choice at these calls is torch's own op on its dense weight (`DenseStandIn`: inductor can pack and fuse it),
while a layer that runs its sparse kernel, or a chain of two (`sparsecc.core.chain`), becomes an `EagerCall`:
one opaque op for inductor that runs it as the eager graph does (its bound kernel and measured tile, a chain's
intermediate in the runtime's layout; as each layer's own custom op, inductor would cut the chain). The result
serves exactly the call it was built for: the same input shapes and strides, torch's thread count at build time
(inductor writes its OpenMP thread count into the code), grad mode off, finite inputs. Everything else runs the
compiled module as before. `CompiledModel.fuse` validates the fused graph against the user's model and keeps it
only where it measures faster than the eager graph (`FUSE_MARGIN`), so fusing is never slower on the call it
serves.

A model whose layers were swapped in place (no captured graph: Hugging Face models) is fused the same way by
`module_graph`: torch.compile of a copy of the model with the same substitutions, static shapes, frozen weights;
a call its guards reject runs the copy eagerly (``eager_on_recompile``), never a recompile in the user's call.
all-MiniLM-L6-v2 2:4 in float32 at 16 tokens, where every layer runs dense by choice and the eager model was
0.94-0.97x dense: fused 1.19-1.21x.

Measured (Xeon with AMX, ViT-B/16 90%, ``precision="bf16"``, same process, dense fp32 = 1): eager graph 4.15x,
fused 5.05x, OpenVINO's default 3.75x at 1 thread; 3.51x / 4.42x / 4.56x at 2. In float32, where the layers run
their sparse kernels, the rest is a small share: ViT-B/16's fused graph ties its eager one (80.2 vs 79.5 ms at 1
thread; with each layer as its custom op it lost, 118.6 vs 108.5), ResNet-50's gains 2-4% (32.3 vs 33.7 ms).
"""

from __future__ import annotations

import copy
import functools
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from sparsecc.compiler import precision as _precision
from sparsecc.core.errors import SparseccError
from sparsecc.core.inputs import Call
from sparsecc.core.layers import CondensedLayer
from sparsecc.core.ops import own

#: The fused graph must be this much faster than the eager graph to be kept (the machine's noise on a whole
#: model is about this size).
FUSE_MARGIN = 0.02


class FuseError(SparseccError):
    """The fused graph could not be built here (no compiler, a graph inductor cannot take)."""


class DenseStandIn(nn.Module):
    """A condensed layer that runs dense by choice, as torch's op on its dense weight: the form inductor packs
    for oneDNN and fuses its bias and activation into. Its weight is decoded here for inductor to lay out, not
    read through ``layer.weight``, which would also cache that dense copy on the layer for the eager graph's life
    (ViT-B/16 in bf16: 172 MB)."""

    def __init__(self, layer: CondensedLayer) -> None:
        super().__init__()
        values = layer._buffers["values"]
        weight = layer._dense_weight().reshape(layer.weight_shape).detach()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", layer._buffers["bias"], persistent=False)
        # `_dense_op`, not `dense_op`: the layer's weight and bias already hold an absorbed affine.
        self.op = layer._dense_op()
        self.dtype, self.cast, self.name = values.dtype, layer.input_cast, layer.name

    def forward(self, x: Tensor) -> Tensor:
        if self.cast and x.dtype != self.dtype and x.is_floating_point():
            x = x.to(self.dtype)
        return self.op(x, self.weight, self.bias)


def dense_by_choice(layer: CondensedLayer, threads: int) -> bool:
    """Whether ``layer`` ran dense by choice on every call size it saw at ``threads`` threads (and saw one)."""
    made = [c for key, c in layer.choices().items() if key[1] == threads]
    return bool(made) and all(c.dense for c in made)


@dataclass
class Fused:
    """A fused graph and the calls it serves. ``order``: for each graph input, its position among the call's
    tensors as `CompiledModel` flattens them (positional, then keyword values in the example's order); None for
    a compiled module (`module_graph`), which takes the call as it is."""

    run: Callable[..., Any]
    order: Optional[tuple[int, ...]]
    threads: int
    dense: int          # condensed layers given to inductor as torch's dense op
    sparse: int         # condensed layers run eagerly (`EagerCall`)
    eager: "EagerCalls"
    spec: Optional[pytree.TreeSpec] = None      # the eager output's structure (inductor answers tuples as lists)
    calls: int = 0      # calls served (validation checks that it ran this graph)
    restructure: Optional[bool] = None      # whether `run`'s answers need ``spec`` (found on the first call)

    def __post_init__(self) -> None:
        weakref.finalize(self, self.eager.release)

    def __call__(self, call: Call, tensors: Sequence[Tensor], dtype: Optional[torch.dtype]) -> Any:
        self.calls += 1
        if self.order is None:      # dynamo's guards: a call they reject runs the module eagerly, never recompiles
            with _precision.running(dtype), torch.compiler.set_stance("eager_on_recompile"):
                out = self.run(*call.args, **call.kwargs)
        else:
            with _precision.running(dtype):
                out = self.run(*[tensors[i] for i in self.order])
        if self.restructure is None:
            self.restructure = self.spec is not None and pytree.tree_structure(out) != self.spec
        if self.restructure:
            out = pytree.tree_unflatten(pytree.tree_leaves(out), self.spec)
        return _precision.restore(out, dtype)


def key(call: Call, tensors: Sequence[Tensor]) -> tuple:
    """What a fused graph is built for and looked up by (with torch's thread count): each input's shape and
    strides (inductor's code assumes both), and how many are positional and the keywords' names."""
    return (len(call.args), tuple(call.kwargs), *((tuple(t.shape), t.stride()) for t in tensors))


def graph_inputs(gm: fx.GraphModule, call: Call, flat: Sequence[Any]) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Where each placeholder of ``gm`` finds its value among ``flat`` (the call's values as `CompiledModel`
    flattens them), and the placeholders the call leaves at their default (``attn_mask=None``), by name, with
    that default: the fused graph bakes them in (it serves only calls like this one). `FuseError` when a
    placeholder the call passes is not a tensor."""
    names = [*[None] * len(call.args), *call.kwargs]
    order, defaults = [], {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        at = names.index(node.target) if node.target in names else (i if i < len(call.args) else None)
        if at is None and node.args:
            defaults[node.name] = node.args[0]
            continue
        if at is None or not isinstance(flat[at], Tensor):
            raise FuseError(f"graph input {node.target!r} is not a tensor of the call (fusing takes calls of "
                            f"tensors only)")
        order.append(at)
    if len(order) != len(flat):
        raise FuseError(f"the graph takes {len(order)} input(s), the call passes {len(flat)}")
    return tuple(order), defaults


def _bake(graph: fx.Graph, defaults: dict[str, Any]) -> None:
    """Replace each placeholder named in ``defaults`` by its value wherever it is used, and drop it."""
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.name in defaults]:
        value = defaults[node.name]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
        graph.erase_node(node)


def fused_graph(gm: fx.GraphModule, inputs: Sequence[Tensor], dtype: Optional[torch.dtype], threads: int,
                defaults: Optional[dict[str, Any]] = None) -> tuple[Callable[..., Any], int, int, "EagerCalls"]:
    """inductor's compilation of ``gm`` (frozen weights, grad off, under ``dtype``'s autocast) with its
    dense-by-choice condensed layers as `DenseStandIn`, the others (and chains of two: `sparsecc.core.chain`)
    as `EagerCall`, and the placeholders in ``defaults`` baked in (see `graph_inputs`); also how many layers
    went dense and how many stay sparse, and the eager calls (which the result needs while it lives).
    `FuseError` when inductor fails."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    graph = copy.deepcopy(gm.graph)
    _bake(graph, defaults or {})
    copy_ = fx.GraphModule(gm, graph)      # its leaves are gm's modules
    dense = sparse = 0
    for path, layer in list(copy_.named_modules()):
        if not isinstance(layer, CondensedLayer):
            continue
        if dense_by_choice(layer, threads):
            _replace(copy_, path, DenseStandIn(layer))
            dense += 1
        else:
            sparse += 1
    eager = EagerCalls()
    try:
        with torch.no_grad(), _precision.running(dtype):
            eager.take(copy_, inputs)
        with torch.no_grad(), config.patch(freezing=True), _precision.running(dtype):
            run = compile_fx(copy_, list(inputs))
    except Exception as exc:  # noqa: BLE001 - any failure of inductor leaves the eager graph, with the reason
        eager.release()
        raise FuseError(f"inductor could not compile the graph ({type(exc).__name__}: {str(exc)[:300]})") from exc
    return run, dense, sparse, eager


def module_graph(module: nn.Module, call: Call, dtype: Optional[torch.dtype], threads: int,
                 outputs: dict[str, set]) -> tuple[Callable[..., Any], int, int, "EagerCalls"]:
    """`fused_graph` for a model whose layers were swapped in place (no captured graph: a Hugging Face model):
    torch.compile (inductor, frozen weights, static shapes) of a copy of ``module`` whose condensed layers are
    `DenseStandIn` where they run dense by choice and `EagerCall` where they run sparse (``outputs``: each
    layer's output metas on ``call``, by path; a layer seen with more than one stays as it is, its custom op),
    compiled here on ``call``. `FuseError` when that fails."""
    root = copy.copy(module)
    root._modules = dict(module._modules)
    dense = sparse = 0
    eager = EagerCalls()
    for path, layer in [(p, m) for p, m in module.named_modules() if isinstance(m, CondensedLayer)]:
        if dense_by_choice(layer, threads):
            _replace(root, path, DenseStandIn(layer))
            dense += 1
            continue
        sparse += 1
        seen = outputs.get(path, set())
        if len(seen) == 1:
            _replace(root, path, eager.add(layer, next(iter(seen))))
    run = torch.compile(_caller(root), dynamic=False, options={"freezing": True})
    try:
        with torch.no_grad(), _precision.running(dtype):
            run(*call.args, **call.kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of dynamo or inductor leaves the eager model
        eager.release()
        raise FuseError(f"torch.compile could not compile the model ({type(exc).__name__}: {str(exc)[:300]})") \
            from exc
    return run, dense, sparse, eager


def layer_outputs(module: nn.Module, run: Callable[[], Any]) -> tuple[dict[str, set], Any]:
    """``run()``'s result and, by path, the output metas (shape, strides, dtype: what an `EagerCall`'s fake
    answers) each condensed layer of ``module`` gave during it (`module_graph` reads them)."""
    outputs: dict[str, set] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, p=p: outputs.setdefault(p, set()).add(
        (tuple(o.shape), o.stride(), o.dtype))) for p, m in module.named_modules() if isinstance(m, CondensedLayer)]
    try:
        with torch.no_grad():
            out = run()
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, out


def _caller(module: nn.Module) -> Callable[..., Any]:
    """``module``'s call in a function whose code object is its own: dynamo keeps its compiled code (and counts
    it against its per-code cache limit) on the code object, and every fused model would share one."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return module(*args, **kwargs)

    call.__code__ = call.__code__.replace(co_name=f"fused_{next(_HANDLES)}")
    return call


#: Live `EagerCall` targets by handle: the callable and its output's (shape, strides, dtype) for the fake.
_EAGER: dict[int, tuple[Callable[[Tensor], Tensor], tuple]] = {}
_HANDLES = itertools.count()


@torch.library.custom_op("sparsecc::fused_eager_call", mutates_args=())
def eager_call(x: Tensor, handle: int) -> Tensor:
    """Run a fused graph's sparse layer (or chain) eagerly, as the compiled graph runs it: its bound kernel,
    its measured tile, a chain's intermediate in the runtime's layout. Only fused graphs call it, in this
    process, for the shapes they were built for (the fake answers the shape recorded then)."""
    return own(_EAGER[handle][0](x), x)


@eager_call.register_fake
def _(x, handle):
    shape, stride, dtype = _EAGER[handle][1]
    return x.new_empty_strided(shape, stride, dtype=dtype)


class EagerCall(nn.Module):
    """A node of a fused graph that inductor calls as an opaque op and that runs eagerly: a sparse layer, or a
    chain fc1 -> activation -> fc2 whose intermediate must stay in the runtime's layout (with each layer as its
    custom op, opaque too, the chain was lost: ViT-B/16 fp32 fused ran 10% slower than its eager graph)."""

    def __init__(self, handle: int) -> None:
        super().__init__()
        self.handle = handle

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.sparsecc.fused_eager_call(x, self.handle)


class EagerCalls:
    """The `EagerCall`s of one fused graph: registered while it lives (`release` when it is dropped)."""

    def __init__(self) -> None:
        self.handles: list[int] = []
        self.chains = 0

    def take(self, gm: fx.GraphModule, inputs: Sequence[Tensor]) -> None:
        """Turn ``gm``'s calls of sparse condensed layers and of chains of two into `EagerCall`s, each with the
        output meta of a run on ``inputs``."""
        from torch.fx.passes.shape_prop import ShapeProp

        from sparsecc.core.chain import chained

        ShapeProp(gm).propagate(*inputs)
        for node in list(gm.graph.nodes):
            meta = node.meta.get("tensor_meta")
            if not isinstance(meta, TensorMetadata) or not node.args or node.kwargs:
                continue
            if node.op == "call_module" and len(node.args) == 1 \
                    and isinstance(gm.get_submodule(node.target), CondensedLayer):
                self._replace(gm, node, gm.get_submodule(node.target), meta)
            elif node.op == "call_function" and node.target is chained:
                x, first, second, acts = node.args
                layers = [gm.get_submodule(n.target) for n in (first, second)]
                if all(isinstance(layer, CondensedLayer) for layer in layers):
                    acts = tuple(gm.get_submodule(a.target) if isinstance(a, fx.Node) else a for a in acts)
                    self._replace(gm, node, functools.partial(chained, first=layers[0], second=layers[1],
                                                              acts=acts), meta, x)
                    self.chains += 1
        # The chains' get_attr nodes stay, unused: dead-code elimination could also drop a user's in-place call
        # whose result is unused (and gm's submodules are the compiled model's).
        gm.recompile()

    def add(self, fn: Callable[[Tensor], Tensor], meta: tuple) -> EagerCall:
        """An `EagerCall` of ``fn``, whose output has ``meta`` (shape, strides, dtype)."""
        handle = next(_HANDLES)
        _EAGER[handle] = (fn, meta)
        self.handles.append(handle)
        return EagerCall(handle)

    def _replace(self, gm: fx.GraphModule, node: fx.Node, fn: Callable[[Tensor], Tensor], meta: TensorMetadata,
                 x: Optional[fx.Node] = None) -> None:
        call_ = self.add(fn, (tuple(meta.shape), tuple(meta.stride), meta.dtype))
        name = f"_sparsecc_eager_{call_.handle}"
        gm.add_submodule(name, call_)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0] if x is None else x,))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)

    def release(self) -> None:
        for handle in self.handles:
            _EAGER.pop(handle, None)
        self.handles.clear()


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` under ``root``, copying (shallowly) each container on the way: the compiled
    module the containers may be shared with keeps its own layers."""
    parent, _, leaf = path.rpartition(".")
    owner = root
    for part in parent.split(".") if parent else ():
        fresh = copy.copy(owner._modules[part])
        fresh._modules = dict(fresh._modules)
        owner._modules[part] = fresh
        owner = fresh
    owner._modules[leaf] = module
