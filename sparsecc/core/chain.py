"""Two condensed Linears with only elementwise activations between them (a transformer MLP: fc1 -> GELU ->
fc2), run as one call that keeps the intermediate in the runtime's own layout.

The TVM runtime's many-token kernel reads its input tokens-last and writes its output tokens-last; each layer
call transposes its input in and its output out. Between fc1 and fc2 that is a transpose of fc1's output and
another of fc2's input, both as large as the hidden layer (3072 x 197 floats in ViT-B/16, beyond the L2 cache),
only to feed an activation that does not care about the layout. A chain applies the activation in place on the
tokens-last intermediate and hands it to fc2 as it is.

The graph keeps both layers at their paths (state dict, report and exports see the same modules): the pass
(`sparsecc.passes.chain`) replaces the three-or-more call nodes by one call of `chained` on the layers and
the activation modules themselves, which falls back to calling them one by one whenever the runtime cannot
chain them (another runtime, tracing, a gradient, a token count or dtype the runtime does not chain, a layer
whose measured choice is its dense op) or an activation cannot run in place as it stands (a Dropout back in
training mode, a module with hooks of its own). Forward hooks on the layers still see each layer's own input
and output: the chain then also writes the intermediate out before and after the activation, and calls the
hooks with them, so validation checks both layers on exactly what the chained call computed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Activation:
    """An elementwise op as the chain runs it: out of place on a tensor, and in place on the runtime's
    intermediate buffer."""

    apply: Callable[[Tensor], Tensor]
    in_place: Callable[[Tensor], object]


def _nothing(t: Tensor) -> Tensor:
    return t


#: The activations a chain may hold, by name.
ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation(_nothing, _nothing),
    "gelu": Activation(F.gelu, lambda t: torch._C._nn.gelu(t, out=t)),
    "gelu_tanh": Activation(lambda t: F.gelu(t, approximate="tanh"),
                            lambda t: torch._C._nn.gelu(t, approximate="tanh", out=t)),
    "relu": Activation(torch.relu, torch.relu_),
    "silu": Activation(F.silu, lambda t: F.silu(t, inplace=True)),
    "tanh": Activation(torch.tanh, torch.tanh_),
    "sigmoid": Activation(torch.sigmoid, torch.sigmoid_),
}


def module_activation(module: nn.Module) -> Optional[str]:
    """The `ACTIVATIONS` name of an eval-mode elementwise module (a Dropout in eval mode is the identity), or
    None. Exact types only: a subclass may compute something else."""
    kind = type(module)
    if kind is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    if kind in (nn.Dropout, nn.Identity):
        return "identity" if kind is nn.Identity or not module.training else None
    return {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}.get(kind)


def function_activation(fn: Callable, args: tuple, kwargs: dict) -> Optional[str]:
    """The `ACTIVATIONS` name of a call ``fn(x, *args, **kwargs)`` in a traced graph, or None."""
    if fn is F.gelu:
        approximate = kwargs.get("approximate", args[0] if args else "none")
        if len(args) > 1 or set(kwargs) - {"approximate"}:
            return None
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    if args or kwargs:
        return None
    return {F.relu: "relu", torch.relu: "relu", F.silu: "silu", torch.tanh: "tanh",
            torch.sigmoid: "sigmoid"}.get(fn)


#: What a chain applies between its layers: an `ACTIVATIONS` name (a traced function call) or the module the
#: graph called (its kind read at call time: a Dropout put back in training mode is no identity).
Act = Union[str, nn.Module]


def _apply(acts: Sequence[Act], h: Tensor) -> Tensor:
    for act in acts:
        h = act(h) if isinstance(act, nn.Module) else ACTIVATIONS[act].apply(h)
    return h


def _names(acts: Sequence[Act]) -> Optional[list[str]]:
    """The `ACTIVATIONS` names of ``acts`` as they stand, or None if one cannot run in place now (a module in
    training mode, a module with hooks of its own)."""
    names = []
    for act in acts:
        if isinstance(act, nn.Module):
            if act._forward_hooks or act._forward_pre_hooks:
                return None
            act = module_activation(act)
            if act is None:
                return None
        names.append(act)
    return names


def _unchained(x: Tensor, first: nn.Module, second: nn.Module, acts: Sequence[Act]) -> Tensor:
    return second(_apply(acts, first(x)))


def _plain_hooks(module: nn.Module) -> bool:
    """Whether ``module``'s hooks are forward hooks of the plain ``hook(module, args, output)`` kind only."""
    return not (module._forward_pre_hooks or module._forward_hooks_with_kwargs)


def chained(x: Tensor, first: nn.Module, second: nn.Module, acts: tuple[Act, ...]) -> Tensor:
    """``second(acts(first(x)))``, with the intermediate kept in the runtime's layout where it can be (see the
    module docstring); called by the graph the chain pass rewrote."""
    from sparsecc.core.layers import CondensedLayer

    names = _names(acts)
    if names is None or not (isinstance(first, CondensedLayer) and isinstance(second, CondensedLayer)) \
            or not (_plain_hooks(first) and _plain_hooks(second)) \
            or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return _unchained(x, first, second, acts)
    bound = first.chain_bound(x)
    then = second.chain_bound(x, first.weight_shape[0])
    if bound is None or then is None or not hasattr(bound, "chain"):
        return _unchained(x, first, second, acts)
    observe = bool(first._forward_hooks or second._forward_hooks)
    done = bound.chain(then, [ACTIVATIONS[name].in_place for name in names], x, observe)
    if done is None:
        return _unchained(x, first, second, acts)
    y, between = done
    if not observe:
        return y
    before, after = between
    result, replaced = before, False
    for hook in list(first._forward_hooks.values()):
        out = hook(first, (x,), result)
        if out is not None:           # a hook that changes fc1's output (as torch lets it): the rest runs on it
            result, replaced = out, True
    if replaced:
        return second(_apply(acts, result))
    for hook in list(second._forward_hooks.values()):
        out = hook(second, (after,), y)
        if out is not None:
            y = out
    return y
