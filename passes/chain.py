"""Chain two condensed Linears that have only elementwise activations between them (fc1 -> GELU [-> eval
Dropout] -> fc2): the nodes become one call of `sparsecc.core.chain.chained`, which keeps the intermediate in
the runtime's layout (see there). Both layers stay at their paths in the module tree (the graph reaches them by
``get_attr``), so state dicts, reports and exports see the same modules; only where a runtime declares that its
kernels chain (`Runtime.chains`) is a pair rewritten.

Left alone: a layer called more than once, an intermediate with another user (a residual, a hook point the
graph reads), an activation with extra arguments or in training mode (Dropout), layers whose widths do not
meet, and any layer not on a chaining runtime. The activation modules stay in the graph's hands: `chained`
calls them itself whenever it runs the layers apart, and checks at each call that they still are what they
were (a Dropout put back in training mode runs as a Dropout)."""

from __future__ import annotations

from collections import Counter
from typing import Optional

from torch import fx

from sparsecc.core.chain import chained, function_activation, module_activation
from sparsecc.core.errors import PassError
from sparsecc.core.layers import CondensedLayer
from sparsecc.core.registry import get_runtime
from sparsecc.passes.manager import PassResult


def _layer(gm: fx.GraphModule, node: fx.Node, calls: Counter) -> Optional[CondensedLayer]:
    """The Linear a node calls, where a chain may start or end at it."""
    if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
        return None
    try:
        layer = gm.get_submodule(node.target)
    except AttributeError:
        return None
    if not isinstance(layer, CondensedLayer) or layer.kind != "linear" \
            or layer.op not in get_runtime(layer.runtime).chains:
        return None
    return layer


def _activation(gm: fx.GraphModule, node: fx.Node, source: fx.Node, calls: Counter) -> Optional[str]:
    """The elementwise op a node applies to ``source`` alone, by `ACTIVATIONS` name, or None. A module's name
    is what it is now (eval); the chain holds the module and reads its kind again at each call."""
    if not node.args or node.args[0] is not source or any(isinstance(a, fx.Node) for a in node.args[1:]) \
            or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    if node.op == "call_module":
        if calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            return None
        try:
            return module_activation(gm.get_submodule(node.target))
        except AttributeError:
            return None
    if node.op == "call_function":
        return function_activation(node.target, tuple(node.args[1:]), dict(node.kwargs))
    return None


def chains(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node], list[str], fx.Node]]:
    """(first layer, activation nodes, their kinds, second layer) of every chain in ``gm``'s graph."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    found = []
    for node in gm.graph.nodes:
        first = _layer(gm, node, calls)
        if first is None:
            continue
        between: list[fx.Node] = []
        names: list[str] = []
        tail = node
        while len(tail.users) == 1:
            (user,) = tail.users
            name = _activation(gm, user, tail, calls)
            if name is None:
                break
            between.append(user)
            names.append(name)
            tail = user
        if len(tail.users) != 1:
            continue
        (last,) = tail.users
        second = _layer(gm, last, calls)
        if second is None or last.args[0] is not tail or second.in_size != first.weight_shape[0]:
            continue
        found.append((node, between, names, last))
    # a layer ends one chain and starts the next (fc1 -> fc2 -> fc3): the first of the two chains wins
    taken: set[fx.Node] = set()
    kept = []
    for chain in found:
        if chain[0] in taken or chain[3] in taken:
            continue
        taken.update((chain[0], chain[3]))
        kept.append(chain)
    return kept


class ChainLinears:
    """``fc2(act(fc1(x)))`` -> ``chained(x, fc1, fc2, acts)``."""

    name = "chain_linears"
    after = ("condense_modules",)
    chained: tuple[str, ...] = ()

    def requires(self, gm: fx.GraphModule) -> None:
        pass

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        done: list[str] = []
        for first, between, names, last in chains(gm):
            with graph.inserting_before(last):
                # modules by reference (their kind is read at call time), traced function calls by name
                acts = tuple(graph.get_attr(n.target) if n.op == "call_module" else name
                             for n, name in zip(between, names))
                call = graph.call_function(chained, (first.args[0], graph.get_attr(first.target),
                                                     graph.get_attr(last.target), acts))
            last.replace_all_uses_with(call)
            for node in (last, *reversed(between), first):
                graph.erase_node(node)
            done.append(f"{first.target} -> {last.target}")
        self.chained = tuple(done)
        return PassResult(gm, bool(done), tuple(done))

    def ensures(self, gm: fx.GraphModule) -> None:
        """Every chain call names two condensed layers of the module."""
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is chained:
                for ref in node.args[1:3]:
                    if ref.op != "get_attr" or not isinstance(gm.get_submodule(ref.target), CondensedLayer):
                        raise PassError(f"chain_linears: {node.name} does not call condensed layers")
