"""Graph rewrites that put condensed modules in place of sparse layers.

Three passes over a torch.fx graph, run by `PassManager`, plus `swap_modules` for models that could not be
traced. All of them only apply the decisions made by `condense.plan`; they never decide themselves.
"""

from __future__ import annotations

from collections import Counter

import torch.nn.functional as F
from torch import fx, nn

from sparsecc.errors import PassError
from sparsecc.passes.condense import Decision
from sparsecc.passes.manager import PassResult

_FUNCTIONAL_LINEAR = {F.linear}


class _Base:
    name = "pass"

    def __init__(self, decisions: dict[str, Decision]) -> None:
        self.decisions = decisions
        self.counts: Counter = Counter()
        self.applied: set[str] = set()

    def requires(self, gm: fx.GraphModule) -> None:
        pass

    def ensures(self, gm: fx.GraphModule) -> None:
        pass


class CondenseModules(_Base):
    """``call_module`` on a Linear/Conv2d whose weight has a replacement -> the replacement module."""

    name = "condense_modules"

    def call(self, gm: fx.GraphModule):
        by_module = {d.layer.module: d for d in self.decisions.values()
                     if d.replacement is not None and d.layer.fqn == f"{d.layer.module}.weight"}
        modified = False
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in by_module:
                decision = by_module[node.target]
                if decision.layer.fqn in self.applied:
                    continue
                gm.set_submodule(node.target, decision.replacement)
                self.applied.add(decision.layer.fqn)
                self.counts[decision.replacement.op] += 1
                modified = True
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        for fqn in self.applied:
            module = self.decisions[fqn].layer.module
            if not hasattr(gm.get_submodule(module), "op"):
                raise PassError(f"{module} was not replaced")


class CondenseFunctionalLinears(_Base):
    """``F.linear(x, <param>, <param>)`` on a parameter with a replacement -> ``call_module`` to a new
    submodule (e.g. MultiheadAttention's in_proj_weight)."""

    name = "condense_functional_linears"

    def call(self, gm: fx.GraphModule):
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _FUNCTIONAL_LINEAR:
                continue
            args = dict(zip(("input", "weight", "bias"), node.args), **node.kwargs)
            weight, bias = args.get("weight"), args.get("bias")
            if not isinstance(weight, fx.Node) or weight.op != "get_attr":
                continue
            decision = self.decisions.get(weight.target)
            if decision is None or decision.replacement is None or decision.layer.fqn in self.applied:
                continue
            expected_bias = decision.layer.bias
            if (bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else bias) != expected_bias:
                continue
            target = "_sparsecc." + weight.target.replace(".", "_")
            if not hasattr(gm, "_sparsecc"):
                gm.add_module("_sparsecc", nn.Module())
            gm.get_submodule("_sparsecc").add_module(target.split(".", 1)[1], decision.replacement)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(target, (args["input"],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            self.applied.add(decision.layer.fqn)
            self.counts[decision.replacement.op] += 1
            modified = True
        return PassResult(gm, modified)


class DropUnusedWeights(_Base):
    """Delete the dense tensors no node reads any more, so the compiled model holds only condensed ones."""

    name = "drop_unused_weights"

    def call(self, gm: fx.GraphModule):
        gm.graph.eliminate_dead_code()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        modified = False
        for decision in self.decisions.values():
            for fqn in (decision.layer.fqn, decision.layer.bias):
                if fqn is None or fqn in used or any(fqn.startswith(m + ".") for m in modules):
                    continue
                owner_name, _, attr = fqn.rpartition(".")
                try:
                    owner = gm.get_submodule(owner_name)
                except AttributeError:
                    continue
                if attr in owner._parameters or attr in owner._buffers:
                    delattr(owner, attr)
                    modified = True
        gm.delete_all_unused_submodules()
        return PassResult(gm, modified)

    def ensures(self, gm: fx.GraphModule) -> None:
        condensed = {m.weight_fqn for m in gm.modules() if hasattr(m, "weight_fqn")}
        left = sorted(condensed & {n for n, _ in gm.named_parameters()})
        if left:
            raise PassError(f"dense weights of condensed layers are still held: {left[:3]}")


def swap_modules(model: nn.Module, decisions: dict[str, Decision]) -> tuple[nn.Module, Counter, set[str]]:
    """Fallback when tracing fails: replace Linear/Conv2d modules in place; functional linears stay."""
    counts: Counter = Counter()
    applied: set[str] = set()
    for fqn, decision in decisions.items():
        if decision.replacement is not None and fqn == f"{decision.layer.module}.weight":
            model.set_submodule(decision.layer.module, decision.replacement)
            counts[decision.replacement.op] += 1
            applied.add(fqn)
    return model, counts, applied
