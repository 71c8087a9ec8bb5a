"""Modules back into an exported graph: ``torch.export`` graphs (``ExportedProgram.module()``, a loaded ``.pt2``)
call ``aten.linear`` / ``aten.conv2d`` / ``aten.batch_norm`` on weights held as attributes, so nothing in them
looks like a layer. `modularize` gives each such call the module it came from -- an ``nn.Linear``, ``nn.Conv2d``
or ``nn.BatchNorm1d/2d`` holding the same tensors at the weight's owner path -- so mask discovery, analysis,
condensing, folding and narrowing see layers, as in a torch.fx graph of the original model.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import fx, nn

aten = torch.ops.aten


def _attr(node: Any) -> Optional[str]:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _linear(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    w = gm.get_parameter(_attr(node.args[1]))
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    m = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    return m if w.dim() == 2 else None


def _conv2d(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    w = gm.get_parameter(_attr(node.args[1]))
    if w.dim() != 4:
        return None
    args = list(node.args) + [None] * (7 - len(node.args))
    bias, stride, padding, dilation, groups = args[2], args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1
    if isinstance(padding, str):
        return None
    return nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias is not None, device="meta")


def _batch_norm(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    x, weight, _, mean, var, training, momentum, eps = node.args[:8]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if training or val is None or val.dim() not in (2, 3, 4) or _attr(mean) is None or _attr(var) is None:
        return None
    cls = nn.BatchNorm2d if val.dim() == 4 else nn.BatchNorm1d
    return cls(gm.get_buffer(_attr(mean)).shape[0], eps=eps, momentum=momentum, affine=weight is not None,
               device="meta")


#: aten op -> (builds the module for a call, or None if it cannot; the call's tensor arguments by attribute).
OPS: dict[Any, tuple[Callable[[fx.GraphModule, fx.Node], Optional[nn.Module]], tuple[tuple[int, str], ...]]] = {
    aten.linear.default: (_linear, ((1, "weight"), (2, "bias"))),
    aten.conv2d.default: (_conv2d, ((1, "weight"), (2, "bias"))),
    aten.batch_norm.default: (_batch_norm, ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))),
}


def _owner(node: fx.Node, slots: tuple[tuple[int, str], ...]) -> Optional[str]:
    """The module path all of the call's tensors live under with the attribute names the module gives them
    (``blocks.0.fc1.weight``, ``blocks.0.fc1.bias``), or None."""
    owners = set()
    for index, attr in slots:
        target = _attr(node.args[index]) if index < len(node.args) else None
        if index < len(node.args) and node.args[index] is not None and target is None:
            return None
        if target is not None:
            owner, _, name = target.rpartition(".")
            if name != attr:
                return None
            owners.add(owner)
    return owners.pop() if len(owners) == 1 else None


def modularize(gm: fx.GraphModule) -> list[str]:
    """Replace each supported aten call on attribute tensors by a ``call_module`` of the matching torch.nn module
    at the tensors' owner path (the same tensors, moved into it). Calls whose tensors are shared with other
    nodes, or live at names a module would not give them, stay as they are. Returns the new modules' paths."""
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
    done: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in OPS:
            continue
        build, slots = OPS[node.target]
        owner = _owner(node, slots)
        if not owner or owner in done or not _alone(gm, owner, slots, uses, node):
            continue
        module = build(gm, node)
        if module is None:
            continue
        holder = gm.get_submodule(owner)
        for index, attr in slots:
            if index < len(node.args) and node.args[index] is not None:
                tensor = getattr(holder, attr)
                if attr in module._parameters:
                    module._parameters[attr] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(
                        tensor, requires_grad=False)
                else:
                    module._buffers[attr] = tensor
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_batches_tracked = getattr(holder, "num_batches_tracked", torch.tensor(0))
        module.eval()
        gm.set_submodule(owner, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(owner, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        done.append(owner)
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return done


def _alone(gm: fx.GraphModule, owner: str, slots: tuple, uses: dict[str, int], node: fx.Node) -> bool:
    """The owner holds only what this call reads, and no other node reads it."""
    try:
        holder = gm.get_submodule(owner)
    except AttributeError:
        return False
    if type(holder) is not nn.Module or any(True for _ in holder.children()):
        return False
    read = {f"{owner}.{attr}" for index, attr in slots if index < len(node.args) and node.args[index] is not None}
    held = {f"{owner}.{name}" for name in [*holder._parameters, *holder._buffers] if name != "num_batches_tracked"}
    return held == read and all(uses.get(name, 0) == 1 for name in read)
