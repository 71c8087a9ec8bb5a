"""How two outputs are compared, leaf by leaf: the one comparison validation, the exporters' file checks and
narrowing's probes share.

Tolerance: ``max|compiled - reference| <= tol(dtype) * max|reference|`` per output tensor (and per layer),
with tol = 1e-4 for fp32. A condensed kernel sums the same products as the dense GEMM in a different order,
so its rounding error grows with the magnitude of the outputs, not of each element; an elementwise relative
tolerance would fail on outputs that happen to be near zero, and a fixed absolute one would not scale.
``max|reference|`` counts as at least the dtype's smallest normal number: an fp16 layer whose outputs are all
subnormal is held to ten of their spacings, not a fraction of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.core.report import ErrorStat

TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
_TINY = 1e-30
NON_FINITE = "your model's output has NaN/Inf here and the compiled model's differs in where"


#: Leaves compared for equality as they are, never taken apart.
_PLAIN = (Tensor, int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size, type)


def _expand(x: Any, path: str, flat: list, names: list[str], seen: set[int], held: list[bool],
            inside: bool = False) -> Any:
    """Append the leaves of ``x`` to ``flat`` (their paths to ``names``, whether an object holds them to
    ``held``); returns its structure. An object pytree does not know (a Hugging Face cache) is taken apart by
    its attributes, in name order; modules and functions it holds are skipped."""
    if isinstance(x, _PLAIN) or id(x) in seen or not hasattr(x, "__dict__"):
        flat.append(x)
        names.append(path)
        held.append(inside)
        return None
    seen.add(id(x))
    structure: list[Any] = [type(x)]
    for name, value in sorted(vars(x).items()):
        if isinstance(value, nn.Module) or (callable(value) and not isinstance(value, type)):
            continue
        leaves, spec = pytree.tree_flatten_with_path(value)
        structure.append((name, spec, [_expand(leaf, f"{path}.{name}{pytree.keystr(key)}", flat, names, seen,
                                               held, True) for key, leaf in leaves]))
    return structure


@dataclass(frozen=True)
class Leaves:
    """A model output taken apart (`flatten_output`): its leaves, its structure, each leaf's path, and whether
    each sits in an object pytree does not know (a Hugging Face cache: state the model reads back on its next
    call, which a ``precision=`` run keeps in its own dtype)."""

    flat: list[Any]
    structure: Any
    names: list[str]
    held: list[bool]


def flatten_output(output: Any) -> Leaves:
    """The leaves of a model's output, its structure and each leaf's path (``[0]``, ``.last_hidden_state``,
    ``.past_key_values.layers[0].keys``), for any nesting of tuples, lists, dicts, dataclasses pytree knows
    (transformers registers its ``ModelOutput``) and other objects (its cache classes)."""
    leaves, spec = pytree.tree_flatten_with_path(output)
    flat: list[Any] = []
    names: list[str] = []
    held: list[bool] = []
    seen: set[int] = set()
    structure = [_expand(leaf, pytree.keystr(key), flat, names, seen, held) for key, leaf in leaves]
    return Leaves(flat, (spec, structure), names, held)


def flatten(output: Any) -> tuple[list[Any], Any, list[str]]:
    """`flatten_output`'s leaves, structure and paths."""
    leaves = flatten_output(output)
    return leaves.flat, leaves.structure, leaves.names


def _same(actual: Any, expected: Any) -> tuple[bool, str]:
    """Equality of two non-tensor leaves; objects without their own ``==`` (identity) by type only."""
    if type(actual) is not type(expected):
        return False, f"{type(actual).__name__} != reference {type(expected).__name__}"
    if type(expected).__eq__ is object.__eq__:
        return True, "compared by type only"
    try:
        return bool(actual == expected), "" if actual == expected else f"{actual!r} != reference {expected!r}"
    except Exception:  # noqa: BLE001 - an == that cannot answer (arrays): the type matched
        return True, "compared by type only"


def compare(what: str, actual: Any, expected: Any, tolerance: Optional[float] = None) -> ErrorStat:
    """Shape, then dtype, then closeness relative to max |expected| (``tolerance`` overrides the dtype's);
    leaves that are not tensors for equality."""
    if not isinstance(actual, Tensor) or not isinstance(expected, Tensor):
        ok, detail = _same(actual, expected)
        return ErrorStat(what, 0.0 if ok else float("inf"), 0.0, 0.0, ok, detail)
    if actual.shape != expected.shape:
        return ErrorStat(what, float("inf"), float("inf"), 0.0, False,
                         f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        return ErrorStat(what, float("inf"), float("inf"), 0.0, False,
                         f"dtype {actual.dtype} != reference {expected.dtype}")
    if not expected.is_floating_point():
        diff = int((actual != expected).sum())
        return ErrorStat(what, float(diff), float(diff), 0.0, diff == 0, f"{diff} elements differ" if diff else "")
    if expected.numel() == 0:
        return ErrorStat(what, 0.0, 0.0, 0.0, True)
    finite = torch.isfinite(expected)
    if not bool(finite.all()):
        # NaN / Inf in the reference must be matched exactly; the finite rest is compared as usual.
        same = torch.equal(torch.isnan(actual), torch.isnan(expected)) and \
            torch.equal(actual[torch.isinf(expected)], expected[torch.isinf(expected)])
        if not same:
            return ErrorStat(what, float("inf"), float("inf"), 0.0, False, NON_FINITE)
        if not bool(finite.any()):
            return ErrorStat(what, 0.0, 0.0, 0.0, True)
        actual, expected = actual[finite], expected[finite]
    # Never below the dtype's smallest normal number: under it values are subnormal, spaced evenly (fp16: by
    # 6e-8), so one rounding in another summation order is a large part of a tiny output.
    scale = max(float(expected.detach().abs().max()), torch.finfo(expected.dtype).tiny, _TINY)
    max_abs = float((actual.detach().double() - expected.detach().double()).abs().max())
    tol = (tolerance if tolerance is not None else TOLERANCE.get(expected.dtype, 1e-4)) * scale
    ok = max_abs <= tol   # False for NaN
    return ErrorStat(what, max_abs, max_abs / scale, tol, ok, "" if ok else f"exceeds tolerance {tol:.2e}")
