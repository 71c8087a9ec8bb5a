"""Residual adds into the condensed layer's output before them: ``add(layer(x), skip)`` -> ``add_into(layer(x),
skip)`` (`sparsecc.core.inplace`, which writes the sum into the layer's output where that is unobservable and
adds out of place otherwise). Only where the layer's output has no other user than the add, the add has two
tensor operands and nothing else (no ``alpha``, no ``out``); either operand may be the layer's (the sum is the
same). A chain of Linears (`sparsecc.core.chain.chained`) counts as a layer: it answers its second layer's
output."""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx, nn

from sparsecc.core.chain import chained
from sparsecc.core.errors import PassError
from sparsecc.core.inplace import add_into
from sparsecc.core.layers import CondensedLayer
from sparsecc.passes.manager import PassResult

#: What a traced graph calls for ``a + b``: torch.fx records the operator, torch.export the aten op.
ADDS = (operator.add, torch.add, torch.ops.aten.add.Tensor)


#: Modules that pass a tensor on as it is in eval mode (a Dropout in training mode answers a fresh tensor: an
#: add into that is as unobservable).
PASS_ON = (nn.Dropout, nn.Identity)


def _fresh(gm: fx.GraphModule, node: object) -> bool:
    """Whether ``node`` is a condensed layer's (or a chain's) output that only one node reads, possibly through
    `PASS_ON` modules that only it reads."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return False
    if node.op == "call_function":
        return node.target is chained
    if node.op != "call_module":
        return False
    try:
        module = gm.get_submodule(node.target)
    except AttributeError:
        return False
    if type(module) in PASS_ON:
        return len(node.args) == 1 and not node.kwargs and _fresh(gm, node.args[0])
    return isinstance(module, CondensedLayer)


def _producer(gm: fx.GraphModule, node: fx.Node) -> str:
    """The layer (or chain) whose output ``node`` is, for the report."""
    while node.op == "call_module" and type(gm.get_submodule(node.target)) in PASS_ON:
        node = node.args[0]
    return node.target if node.op == "call_module" else node.args[2].target      # a chain: its second layer


def _operands(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(the layer's output, the other operand) of an add the pass may rewrite, or None."""
    if node.op != "call_function" or node.target not in ADDS or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
        return None
    if _fresh(gm, a):
        return a, b
    if _fresh(gm, b):
        return b, a
    return None


class AddInPlace:
    """``layer(x) + skip`` -> ``add_into(layer(x), skip)``."""

    name = "add_in_place"
    after = ("condense_modules",)

    def requires(self, gm: fx.GraphModule) -> None:
        pass

    def call(self, gm: fx.GraphModule) -> PassResult:
        done = []
        for node in list(gm.graph.nodes):
            operands = _operands(gm, node)
            if operands is None:
                continue
            node.target, node.args = add_into, operands
            done.append(_producer(gm, operands[0]))
        return PassResult(gm, bool(done), tuple(done))

    def ensures(self, gm: fx.GraphModule) -> None:
        """Every `add_into` writes into the output of a layer (or chain) that nothing else reads."""
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is add_into and not _fresh(gm, node.args[0]):
                raise PassError(f"add_in_place: {node.name} writes into {node.args[0]}, which is not a condensed "
                                f"layer's output read by it alone")
