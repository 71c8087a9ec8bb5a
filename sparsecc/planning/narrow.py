"""Physically narrower networks: output channels that are constant (ablated neurons: an all-zero weight row)
or unused (every consumer's columns for them are all zero) are removed from the producing Linear/Conv2d,
from the BatchNorms between, and from every consuming Linear/Conv2d, whose bias absorbs what the constant
contributed.

A producer ``P`` is narrowed when every path from its output reaches a Linear/Conv2d input through ops
that act per channel (`PER_CHANNEL`: activations, dropout, BatchNorm, pooling, flatten into a Linear);
paths may branch (one output feeding several consumers, e.g. separate q/k/v projections). The constant a
removed channel carries is P's bias pushed through each path's ops, exactly. Not crossed: ops that mix
channels (LayerNorm, softmax, attention) or combine tensors (a residual add whose other branch keeps the
channel), and the model's output; a consumer that zero-pads (a constant channel is not constant at the
padded border) takes only channels whose constant is exactly 0; grouped convolutions and 2:4 consumers
(removing inputs breaks the groups of 4) are left. Each producer that is not narrowed says why.

The consumers' masks lose the removed columns; rows whose fan-in drops below the layer's new maximum get
explicit zero-weight entries on inputs they did not use, so a constant fan-in layer stays one (its MACs
shrink to the new maximum k).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from sparsecc.capture.graph import Tracer, concrete_defaults, exported_graph
from sparsecc.capture.masks import Layer, Prepared, structural_copy
from sparsecc.core import patterns, reductions
from sparsecc.core.compare import compare, flatten
from sparsecc.core.errors import PassError
from sparsecc.core.inputs import Call
from sparsecc.planning.analysis import analyse

#: Modules that act on each channel alone: a constant channel stays constant and keeps its index.
PER_CHANNEL: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU,
                                 nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.Mish, nn.Dropout, nn.Identity,
                                 nn.BatchNorm1d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.Flatten)
_aten = torch.ops.aten
#: The same as functions, as torch.fx records them and as torch.export does (aten ops).
PER_CHANNEL_FUNCTIONS: frozenset[Callable] = frozenset({
    torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu, torch.sigmoid,
    torch.tanh, torch.nn.functional.dropout, torch.flatten, _aten.relu.default, _aten.gelu.default,
    _aten.silu.default, _aten.sigmoid.default, _aten.tanh.default, _aten.dropout.default, _aten.flatten.using_ints,
    _aten.hardtanh.default, _aten.hardswish.default, _aten.hardsigmoid.default, _aten.clone.default})
FLATTEN_FUNCTIONS = (torch.flatten, _aten.flatten.using_ints)


@dataclass(frozen=True)
class Removal:
    """One narrowed producer and its consumers: widths before and after, and how many removed channels were
    constant (folded into the consumers' biases) or unused by every consumer."""

    producer: str
    consumer: str              # consumers, comma-separated
    before: int
    after: int
    folded: int
    unused: int

    def __str__(self) -> str:
        into = ", ".join(f"{c}.bias" for c in self.consumer.split(", "))
        return (f"{self.producer} -> {self.consumer}: {self.before} -> {self.after} channels "
                f"({self.folded} constant folded into {into}, {self.unused} unused)")


@dataclass
class Narrowing:
    """The narrowed copy of the reference, its layers (masks sliced), and what was and was not removed."""

    model: nn.Module
    layers: dict[str, Layer]
    removals: list[Removal] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)    # producer -> why it was not narrowed
    graph: str = "torch.fx"        # which capture found the producer -> consumer chains ("none": neither)
    exported: Optional[fx.GraphModule] = None   # torch.export's graph, when it was the one read


@dataclass(frozen=True)
class _Chain:
    consumer: str
    ops: tuple[fx.Node, ...]       # the per-channel ops between producer and consumer, in order
    spatial: int                   # consumer inputs per channel (H*W after a flatten into a Linear, else 1)


def _per_channel(node: fx.Node, model: nn.Module) -> Optional[str]:
    """None if ``node`` keeps channels apart (and their index), else why not."""
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        if isinstance(mod, nn.Flatten) and mod.start_dim != 1:
            return f"{node.target} flattens from dim {mod.start_dim}"
        if isinstance(mod, nn.MaxPool2d) or isinstance(mod, PER_CHANNEL):
            return None
        return f"{node.target} ({type(mod).__name__}) mixes or reorders channels"
    if node.op == "output":
        return "it is the model's output"
    if node.op == "call_function" and node.target in PER_CHANNEL_FUNCTIONS:
        if node.target in FLATTEN_FUNCTIONS and (node.args[1:2] or [node.kwargs.get("start_dim", 0)])[0] != 1:
            return "torch.flatten not from dim 1"
        if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            return f"{node.name} takes a second tensor"
        return None
    return f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)}) is not per-channel"


def _chains(producer: fx.Node, model: nn.Module, weights: set[str]) -> "list[_Chain] | str":
    """Every path from ``producer``'s output to a Linear/Conv2d input through per-channel ops (branches
    included), or why a path leaves the per-channel world."""
    chains: list[_Chain] = []

    def walk(node: fx.Node, ops: list[fx.Node]) -> Optional[str]:
        for user in node.users:
            if user.op == "call_module" and user.target in weights:
                if user.args[0] is not node:
                    return f"{user.target} takes it as a second argument"
                flat = [n for n in ops if _is_flatten(n, model)]
                spatial = 1
                if flat:
                    meta = flat[0].args[0].meta
                    shape = meta.get("tensor_meta", meta.get("val"))     # ShapeProp's, or torch.export's
                    if shape is None:
                        return "flatten into a Linear needs example inputs (spatial size)"
                    spatial = int(torch.Size(shape.shape[2:]).numel())
                chains.append(_Chain(user.target, tuple(ops), spatial))
                continue
            why = _per_channel(user, model) or walk(user, ops + [user])
            if why:
                return why
        return None

    why = walk(producer, [])
    return why if why else chains


def _is_flatten(node: fx.Node, model: nn.Module) -> bool:
    return ((node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.Flatten))
            or (node.op == "call_function" and node.target in FLATTEN_FUNCTIONS))


def _plane(chain: _Chain) -> tuple[int, ...]:
    """The spatial size of the producer's output, from the graph's shapes (1x1 where it has none)."""
    for node in chain.ops:
        arg = node.args[0] if node.args else None
        meta = getattr(arg, "meta", {})
        shape = meta.get("tensor_meta", meta.get("val"))
        if shape is not None and len(shape.shape) == 4:
            return tuple(int(d) for d in shape.shape[2:])
    return (1, 1)


def _constants(producer: nn.Module, chain: _Chain, model: nn.Module) -> Tensor:
    """What each output channel of ``producer`` becomes at the consumer's input when its weight row is zero."""
    channels = producer.weight.shape[0]
    v = producer.bias.detach().clone() if producer.bias is not None else producer.weight.new_zeros(channels)
    # A constant plane of the size the chain sees (a 2x2 max pool has no output for a 1x1 plane): every entry of
    # the result is that constant after per-channel ops (a max pool pads with -inf).
    if isinstance(producer, nn.Conv2d):
        x = v.view(1, channels, 1, 1).expand(1, channels, *_plane(chain)).contiguous()
    else:
        x = v.view(1, channels)
    with torch.no_grad():
        for node in chain.ops:
            if _is_flatten(node, model):
                continue
            if node.op == "call_module":
                x = model.get_submodule(node.target)(x)
            else:
                x = node.target(x, *node.args[1:], **node.kwargs)
    return x.reshape(1, channels, -1)[0, :, 0]    # pooling may have grown the 1x1 plane: every entry is equal


def _columns(chain: _Chain, channels: Tensor) -> Tensor:
    """The consumer's input columns of ``channels`` (a flattened channel spans ``spatial`` columns)."""
    return (channels[:, None] * chain.spatial + torch.arange(chain.spatial)).flatten()


def _fold(consumer: nn.Module, chain: _Chain, constant: Tensor, folded: Tensor) -> None:
    """Add what the ``folded`` channels (constant at the consumer's input) contribute to the consumer's bias."""
    if not bool(folded.any()):
        return
    idx = torch.nonzero(folded).flatten()
    with torch.no_grad():
        w = consumer.weight
        if isinstance(consumer, nn.Linear):
            add = w[:, _columns(chain, idx)] @ constant[idx].repeat_interleave(chain.spatial)
        else:
            add = w[:, idx].sum((2, 3)) @ constant[idx]
        if consumer.bias is None:
            consumer.bias = nn.Parameter(add.clone())
        else:
            consumer.bias = nn.Parameter(consumer.bias + add)   # a new tensor: the reference shares the old one


def _slice(model: nn.Module, producer_name: str, chains: list[_Chain], keep: Tensor) -> None:
    """Keep only the ``keep`` channels in the producer, the BatchNorms on the way and every consumer."""
    kept = torch.nonzero(keep).flatten()
    with torch.no_grad():
        producer = model.get_submodule(producer_name)
        producer.weight = nn.Parameter(producer.weight[kept].clone())
        if producer.bias is not None:
            producer.bias = nn.Parameter(producer.bias[kept].clone())
        if isinstance(producer, nn.Linear):
            producer.out_features = len(kept)
        else:
            producer.out_channels = len(kept)
        norms = {n.target for chain in chains for n in chain.ops if n.op == "call_module"
                 and isinstance(model.get_submodule(n.target), (nn.BatchNorm1d, nn.BatchNorm2d))}
        for name in norms:
            bn = model.get_submodule(name)
            for attr in ("weight", "bias"):
                if getattr(bn, attr) is not None:
                    setattr(bn, attr, nn.Parameter(getattr(bn, attr)[kept].clone()))
            for attr in ("running_mean", "running_var"):
                if getattr(bn, attr) is not None:
                    setattr(bn, attr, getattr(bn, attr)[kept].clone())
            bn.num_features = len(kept)
        for chain in chains:
            consumer = model.get_submodule(chain.consumer)
            if isinstance(consumer, nn.Linear):
                consumer.weight = nn.Parameter(consumer.weight[:, _columns(chain, kept)].clone())
                consumer.in_features = consumer.weight.shape[1]
            else:
                consumer.weight = nn.Parameter(consumer.weight[:, kept].clone())
                consumer.in_channels = len(kept)


def _slice_masks(layers: dict[str, Layer], producer: str, chains: list[_Chain], keep: Tensor,
                 model: nn.Module) -> None:
    kept = torch.nonzero(keep).flatten()
    p = layers[f"{producer}.weight"]
    layers[p.fqn] = replace(p, mask=p.mask[kept].clone())
    for chain in chains:
        c = layers[f"{chain.consumer}.weight"]
        mask = c.mask[:, _columns(chain, kept)] if c.kind == "linear" else c.mask[:, kept]
        consumer = model.get_submodule(chain.consumer)
        layers[c.fqn] = replace(c, mask=_even_fan_in(mask.clone(), consumer.weight),
                                bias=f"{chain.consumer}.bias" if consumer.bias is not None else None)


def _even_fan_in(mask: Tensor, weight: Tensor) -> Tensor:
    """Rows below the largest remaining fan-in get explicit entries on inputs they do not use (weight 0 there,
    so nothing changes): a constant fan-in mask stays constant fan-in. Ablated rows stay empty."""
    rows = mask.reshape(mask.shape[0], -1)
    counts = reductions.row_counts(rows)
    k = int(counts.max()) if rows.numel() else 0
    if k == 0 or bool(((counts == k) | (counts == 0)).all()) or k == rows.shape[1]:
        return mask
    need = torch.where(counts > 0, k - counts, 0)
    free = ~rows & (weight.detach().reshape(rows.shape) == 0)
    # The first `need` free positions of each row (by its running count of free positions).
    out = rows | (free & (free.cumsum(1, dtype=torch.int32) <= need[:, None]))
    return out.reshape(mask.shape)


def narrow(prepared: Prepared, example_inputs: Any = ()) -> Narrowing:
    """A copy of the reference with constant and unused channels removed (see the module docstring).
    ``example_inputs``: a `Call` or a tuple of positional inputs."""
    example_inputs = Call.of(example_inputs)
    model = structural_copy(prepared.reference)
    layers = dict(prepared.layers)
    result = Narrowing(model, layers)
    try:
        gm = fx.GraphModule(model, Tracer().trace(model, concrete_args=concrete_defaults(
            model, example_inputs or None) or None))
    except Exception as exc:  # noqa: BLE001 - untraceable by fx: torch.export's graph, or nothing is narrowed
        gm, why = exported_graph(model, example_inputs)
        if gm is None:
            result.skipped["<model>"] = f"not traceable by torch.fx ({type(exc).__name__}){why}"
            result.graph = "none"
            return result
        result.graph = f"torch.export (torch.fx: {type(exc).__name__})"
        result.exported = gm
    if example_inputs and result.graph == "torch.fx":
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            bound = inspect.signature(gm.forward).bind(*example_inputs.args, **example_inputs.kwargs)
            ShapeProp(gm).propagate(*bound.args)
    weights = {lay.module for lay in layers.values() if lay.fqn.endswith(".weight")
               and isinstance(model.get_submodule(lay.module), (nn.Linear, nn.Conv2d))}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in weights:
            continue
        why = _narrow_pair(model, layers, node, weights, result)
        if why:
            result.skipped[node.target] = why
    if example_inputs and result.removals:
        _check(prepared.reference, model, example_inputs)
    return result


def _narrow_pair(model: nn.Module, layers: dict[str, Layer], node: fx.Node, weights: set[str],
                 result: Narrowing) -> Optional[str]:
    producer = model.get_submodule(node.target)
    if getattr(producer, "groups", 1) != 1:
        return "grouped convolution"
    chains = _chains(node, model, weights)
    if isinstance(chains, str):
        return chains
    if not chains:
        return "its output reaches no Linear/Conv2d"
    calls = [n.target for n in node.graph.nodes if n.op == "call_module"]
    meta = node.meta.get("tensor_meta")
    remove = torch.ones(producer.weight.shape[0], dtype=torch.bool)
    folds: list[tuple[Tensor, Tensor]] = []   # per consumer: its unused channels, the constants it sees
    for chain in chains:
        why = _pair_problem(model, layers, node.target, producer, chain, meta, calls)
        if why:
            return why
        consumer = model.get_submodule(chain.consumer)
        c_layer = layers[f"{chain.consumer}.weight"]
        cw = c_layer.mask.reshape(c_layer.mask.shape[0], -1, chain.spatial) if c_layer.kind == "linear" \
            else c_layer.mask      # [rows, channels, positions per channel...]
        unused = ~reductions.used_inputs(cw)
        constant = _constants(producer, chain, model)
        pads = isinstance(consumer, nn.Conv2d) and (consumer.padding != "valid" if isinstance(consumer.padding, str)
                                                     else any(consumer.padding))
        foldable = _ablated(layers, node.target) & ((constant == 0) | torch.tensor(not pads))
        remove &= unused | foldable
        folds.append((unused, constant))
    if not bool(remove.any()):
        if bool(_ablated(layers, node.target).any()):
            return "a consumer zero-pads: its constant channels are not constant at the border"
        return "no ablated or unused channels"
    if bool(remove.all()):
        return "every channel is removable: the layer's output is a constant (left as it is)"
    keep = ~remove
    for chain, (unused, constant) in zip(chains, folds):
        _fold(model.get_submodule(chain.consumer), chain, constant, remove & ~unused)
    _slice(model, node.target, chains, keep)
    _slice_masks(layers, node.target, chains, keep, model)
    constant_removed = remove & ~torch.stack([u for u, _ in folds]).all(0)
    result.removals.append(Removal(node.target, ", ".join(c.consumer for c in chains), int(remove.numel()),
                                   int(keep.sum()), int(constant_removed.sum()),
                                   int((remove & ~constant_removed).sum())))
    return None


def _ablated(layers: dict[str, Layer], producer: str) -> Tensor:
    return ~reductions.live_rows(layers[f"{producer}.weight"].mask)


def _pair_problem(model: nn.Module, layers: dict[str, Layer], name: str, producer: nn.Module, chain: _Chain,
                  meta, calls: list) -> Optional[str]:
    """Why ``producer`` cannot lose channels towards ``chain.consumer``, or None."""
    consumer = model.get_submodule(chain.consumer)
    flattens = any(_is_flatten(n, model) for n in chain.ops)
    if isinstance(producer, nn.Linear) and (isinstance(consumer, nn.Conv2d) or flattens):
        return f"{chain.consumer} does not read {name}'s features as its channels"
    if isinstance(producer, nn.Conv2d) and isinstance(consumer, nn.Linear) and not flattens:
        return f"{chain.consumer} reads {name}'s last spatial axis, not its channels"
    norms = [n.target for n in chain.ops if n.op == "call_module"
             and isinstance(model.get_submodule(n.target), (nn.BatchNorm1d, nn.BatchNorm2d))]
    if isinstance(producer, nn.Linear) and norms and (meta is None or len(meta.shape) != 2):
        return "BatchNorm1d after a Linear normalises dim 1, the features only for 2-D inputs"
    if any(calls.count(n) > 1 for n in norms):
        return f"a BatchNorm between {name} and {chain.consumer} is called more than once"
    if getattr(consumer, "groups", 1) != 1:
        return f"consumer {chain.consumer} is a grouped convolution"
    c_layer = layers[f"{chain.consumer}.weight"]
    pattern = patterns.of(analyse(c_layer.fqn, c_layer.mask).structure)
    if pattern is not None and not pattern.narrows_inputs:
        return f"consumer {chain.consumer} is {pattern.name}: removing inputs would break its pattern"
    return None


def _check(reference: nn.Module, narrowed: nn.Module, inputs: Call) -> None:
    """The narrowed model must compute what the reference computes; a mismatch is a bug in this pass."""
    with torch.no_grad():
        expected, actual = inputs(reference), inputs(narrowed)
    for i, (e, a) in enumerate(zip(flatten(expected)[0], flatten(actual)[0])):
        stat = compare(f"output {i}", a, e)
        if not stat.ok:
            raise PassError(f"narrow: the narrowed model differs from the reference ({stat}); compile with "
                            f"narrow=False and report this model")
