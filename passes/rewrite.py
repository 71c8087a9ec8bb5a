"""Graph rewrites that put condensed modules in place of sparse layers.

Three passes over a torch.fx graph, run by `PassManager`, plus `swap_modules` for models that could not be
traced. All of them only apply the decisions made by `condense.plan`; they never decide themselves.
"""

from __future__ import annotations

from collections import Counter

import torch.nn.functional as F
from torch import fx, nn

from sparsecc.core.errors import PassError
from sparsecc.passes.manager import PassResult
from sparsecc.planning.condense import Decision

#: Functional op -> (layer kind it computes, names of its leading arguments).
_FUNCTIONAL = {
    F.linear: ("linear", ("input", "weight", "bias")),
    F.conv2d: ("conv2d", ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
}


def _same_conv(args: dict, replacement: nn.Module) -> bool:
    """Whether an F.conv2d call uses the convolution parameters the replacement was built with."""
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    return (pair(args.get("stride", 1)) == replacement.stride and pair(args.get("padding", 0)) == replacement.padding
            and pair(args.get("dilation", 1)) == replacement.dilation and args.get("groups", 1) == replacement.groups)


class _Base:
    name = "pass"
    after: tuple[str, ...] = ()

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

    def requires(self, gm: fx.GraphModule) -> None:
        """Every replacement is a fresh module: one already in the graph was condensed before (a graph
        compiled twice, or a decision shared between graphs)."""
        inside = {id(m) for m in gm.modules()}
        twice = sorted(f for f, d in self.decisions.items()
                       if d.replacement is not None and id(d.replacement) in inside)
        if twice:
            raise PassError(f"{self.name}: the condensed module(s) of {twice[:3]} are already in the graph")

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
        return PassResult(gm, modified, tuple(sorted(self.applied)))

    def ensures(self, gm: fx.GraphModule) -> None:
        for fqn in self.applied:
            module = self.decisions[fqn].layer.module
            if not hasattr(gm.get_submodule(module), "op"):
                raise PassError(f"{module} was not replaced")


class CondenseFunctionalOps(_Base):
    """``F.linear`` / ``F.conv2d`` on a parameter with a replacement -> ``call_module`` to a new submodule
    (MultiheadAttention's in_proj_weight; the forward of a Linear or Conv2d that is the root module)."""

    name = "condense_functional_ops"
    after = ("condense_modules",)     # a module call is condensed as a module; only the rest is functional

    def call(self, gm: fx.GraphModule):
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _FUNCTIONAL:
                continue
            kind, names = _FUNCTIONAL[node.target]
            args = dict(zip(names, node.args), **node.kwargs)
            weight, bias = args.get("weight"), args.get("bias")
            if not isinstance(weight, fx.Node) or weight.op != "get_attr":
                continue
            decision = self.decisions.get(weight.target)
            if decision is None or decision.replacement is None or decision.layer.fqn in self.applied \
                    or decision.layer.kind != kind or (kind == "conv2d" and not _same_conv(args, decision.replacement)):
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
        return PassResult(gm, modified, tuple(sorted(self.applied)))


class DropUnusedWeights(_Base):
    """Delete the dense tensors no node reads any more, so the compiled model holds only condensed ones."""

    name = "drop_unused_weights"
    after = ("condense_modules", "condense_functional_ops")   # dense tensors are unused only once both ran

    def requires(self, gm: fx.GraphModule) -> None:
        pass

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
    """Fallback when tracing fails: replace Linear/Conv2d modules in place. Functional linears stay, and so
    does attention's out_proj, which nn.MultiheadAttention reads as a weight rather than calls."""
    counts: Counter = Counter()
    applied: set[str] = set()
    for fqn, decision in decisions.items():
        module = decision.layer.module
        if decision.replacement is None or fqn != f"{module}.weight" or not module:
            continue
        if isinstance(model.get_submodule(module.rpartition(".")[0]), nn.MultiheadAttention):
            continue
        model.set_submodule(module, decision.replacement)
        counts[decision.replacement.op] += 1
        applied.add(fqn)
    return model, counts, applied
