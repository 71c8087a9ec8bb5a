"""What an exported file's inputs and outputs are called and which of their axes are free, taken from the model.

Users serve files by name: a Triton client sends ``input_ids`` and ``attention_mask`` and reads ``logits``, as
``optimum-cli export onnx`` writes them. So inputs take the names of ``forward``'s parameters (or the keys of the
keyword inputs), outputs the paths of the output structure (``logits``, ``last_hidden_state``; tuple positions as
``output_0``), and every axis that varies with the input length is free: torch.export is asked to find them
(``Dim.AUTO`` on every axis but the batch, which must be free: ``Dim.DYNAMIC``), and `other_sizes` gives the
sizes the written file is checked at before it is kept.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.core.errors import InputError
from sparsecc.core.inputs import Call

#: ``dynamic_axes=`` values: "auto" (the batch and every axis torch.export finds free), "batch" (the batch only).
DYNAMIC = ("auto", "batch")


def tensor_leaves(call: Call) -> list[Tensor]:
    """The call's tensors in the order torch.export (and so the exported file) takes them."""
    return [t for t in pytree.tree_leaves((call.args, dict(call.kwargs))) if isinstance(t, Tensor)]


def check_dynamic(dynamic_axes: Any) -> None:
    if isinstance(dynamic_axes, dict):
        for name, axes in dynamic_axes.items():
            if not isinstance(name, str) or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
                raise InputError(f"dynamic_axes={dynamic_axes!r}: map input names to lists of axis numbers")
        return
    if dynamic_axes not in DYNAMIC:
        raise InputError(f"dynamic_axes={dynamic_axes!r}: give 'auto', 'batch' or {{input name: [axes]}}")


class _Named(nn.Module):
    """Calls ``inner``; `with_parameters` gives each use a subclass whose ``forward`` carries the signature."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def with_parameters(module: nn.Module, parameters: Iterable[inspect.Parameter]) -> nn.Module:
    """``module`` behind a ``forward`` whose signature is ``parameters``: what torch.export binds a call by (and
    names the program's inputs after)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *parameters])
    return type(f"{type(module).__name__}Named", (_Named,), {"forward": forward})(module)


def explicit(module: nn.Module, call: Call) -> nn.Module:
    """``module`` with a ``forward`` whose signature names every keyword input of ``call``. An input that binds to
    a ``**kwargs`` parameter (transformers models take extra inputs that way) exports, but the program's guards
    then name an input the program does not define, and running it fails (``NameError: name 'L' is not
    defined``); torch.export binds inputs by the signature, so naming them fixes it. ``module`` itself when every
    keyword input has a parameter of its own."""
    parameters = inspect.signature(module.forward).parameters
    extra = [k for k in call.kwargs if k not in parameters]
    if not extra or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return module
    named = [p for p in parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return with_parameters(module, named + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None)
                                            for k in extra])


def _bound(module: nn.Module, call: Call) -> Optional[inspect.BoundArguments]:
    try:
        return inspect.signature(module.forward).bind(*call.args, **call.kwargs)
    except (TypeError, ValueError):
        return None


def _axes_spec(t: Tensor, name: str, dynamic_axes: Any) -> dict[int, Any]:
    dim = torch.export.Dim
    if isinstance(dynamic_axes, dict):
        free = set(dynamic_axes.get(name, ()))
        return {a: (dim.DYNAMIC if a == 0 or a in free else dim.STATIC) for a in range(t.dim())}
    if dynamic_axes == "batch":
        return {0: dim.DYNAMIC} if t.dim() else {}
    return {a: (dim.DYNAMIC if a == 0 else dim.AUTO) for a in range(t.dim())}


def _spec(value: Any, name: str, dynamic_axes: Any) -> Any:
    if isinstance(value, Tensor):
        return _axes_spec(value, name, dynamic_axes) if value.dim() else None
    if isinstance(value, dict):
        return {k: _spec(v, k, dynamic_axes) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_spec(v, f"{name}_{i}", dynamic_axes) for i, v in enumerate(value))
    return None


def dynamic_shapes(module: nn.Module, call: Call, dynamic_axes: Any) -> Any:
    """torch.export's ``dynamic_shapes`` for ``call``: keyed by ``forward``'s parameter names where the call
    binds to them, else positional (inputs ``input{i}``)."""
    bound = _bound(module, call)
    if bound is None:
        return tuple(_spec(a, f"input{i}", dynamic_axes) for i, a in enumerate(call.args))
    return {name: _spec(value, name, dynamic_axes) for name, value in bound.arguments.items()}


def input_names(program: torch.export.ExportedProgram) -> list[str]:
    """The program's user inputs as torch.export named them: ``forward``'s parameter names, keyword keys."""
    from torch.export.graph_signature import InputKind

    return [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]


def _key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def output_names(output: Any) -> list[str]:
    """Each output tensor's path in the output structure: ``logits``, ``hidden_states.0``; positions of a
    tuple or list as ``output_0``; a lone tensor ``output``."""
    leaves = [(path, leaf) for path, leaf in pytree.tree_flatten_with_path(output)[0] if isinstance(leaf, Tensor)]
    names: list[str] = []
    for path, _ in leaves:
        parts = [_key(p) for p in path]
        if not parts:
            name = "output"
        elif parts[0].isdigit():
            name = "output_" + "_".join(parts)
        else:
            name = ".".join(parts)
        name = re.sub(r"[^A-Za-z0-9_.]", "_", name)
        while name in names:
            name += "_"
        names.append(name)
    return names


def free_sizes(program: torch.export.ExportedProgram) -> list[list[Any]]:
    """Per user input, its shape as torch.export recorded it (ints, or symbolic sizes where free)."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [list(placeholders[name].meta["val"].shape) for name in input_names(program)]


def other_sizes(program: torch.export.ExportedProgram, steps: tuple[int, ...] = (-1, 3)) -> list[list[list[int]]]:
    """For each step, every input's shape with the symbols of its free sizes beyond the batch moved by ``step``
    (kept in their range; symbols shared between inputs move together, the batch stays): the shapes the
    written file is checked at. Empty when no axis but the batch is free."""
    shapes = free_sizes(program)
    every = {s for shape in shapes for d in shape if isinstance(d, torch.SymInt) for s in d.node.expr.free_symbols}
    moving = {s for shape in shapes for d in shape[1:] if isinstance(d, torch.SymInt)
              for s in d.node.expr.free_symbols}
    if not moving:
        return []
    out = []
    for step in steps:
        values = {s: _hint(program, s) for s in every}
        for s in moving:
            lower, upper = _range(program, s, values[s])
            values[s] = min(max(values[s] + step, lower, 2), upper)
        out.append([[int(d.node.expr.subs(values)) if isinstance(d, torch.SymInt) else int(d) for d in shape]
                    for shape in shapes])
    return out


def _range(program: torch.export.ExportedProgram, symbol: Any, value: int) -> tuple[int, int]:
    """The bounds torch.export recorded for a size symbol (unbounded above: the example plus 64)."""
    rng = program.range_constraints.get(symbol)
    bounds = []
    for bound, default in ((getattr(rng, "lower", None), 2), (getattr(rng, "upper", None), value + 64)):
        try:
            bounds.append(int(bound))
        except (TypeError, ValueError, OverflowError, AttributeError):
            bounds.append(default)
    return bounds[0], bounds[1]


def _hint(program: torch.export.ExportedProgram, symbol: Any) -> int:
    """The example's value of a size symbol (the shape environment keeps it)."""
    for shape in free_sizes(program):
        for d in shape:
            if isinstance(d, torch.SymInt):
                env = d.node.shape_env
                table = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
                value = table.get(symbol)
                if value is not None:
                    return int(value)
    raise ValueError(f"no example value for {symbol}")


def resized(t: Tensor, shape: list[int]) -> Tensor:
    """``t`` at ``shape``, its entries repeated cyclically along each axis (token ids stay token ids, masks
    stay masks)."""
    out = t
    for axis, size in enumerate(shape):
        if size != out.shape[axis]:
            out = out.index_select(axis, torch.arange(size) % out.shape[axis])
    return out.contiguous()
