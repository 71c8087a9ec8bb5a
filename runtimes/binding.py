"""Per-layer bindings cached on the layer's values tensor, for every op runtime that binds.

Graphs run by torch.compile or loaded from a .pt2 call an op with the same constant tensors every time, and
binding (row maps, tap offsets, a measured choice, a decoded dense weight) is not free. Each runtime keeps its
own slot (``_sparsecc_bound`` for TVM, ``_sparsecc_bound_<name>`` for the others), so a values tensor bound by
two runtimes never rebinds back and forth.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor


class Binding:
    """What `bound` keeps on a values tensor. Compiled kernels can be neither deep-copied nor pickled (so
    ``copy.deepcopy`` and ``torch.save`` of the tensor failed): a deep copy gets None and a pickle an empty set
    (a type ``torch.load(weights_only=True)`` accepts) in its place, and binds again when called."""

    __slots__ = ("key", "fn", "constants")

    def __init__(self, key: tuple, fn: Callable[[Tensor], Tensor], constants: tuple) -> None:
        self.key, self.fn, self.constants = key, fn, constants

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return set, ()


def bound(slot: str, bind: Callable[..., Callable[[Tensor], Tensor]], op: str, *constants
          ) -> Callable[[Tensor], Tensor]:
    """``bind(op, *constants)``, cached on the layer's values tensor under ``slot``. The cache keeps the
    constants alive, so their ids stay unique, and keys on their versions (in-place edits rebind)."""
    values = constants[0]
    key = (op, *((id(c), c._version) if isinstance(c, Tensor) else c for c in constants))
    cached = values.__dict__.get(slot)
    if not isinstance(cached, Binding) or cached.key != key:
        cached = values.__dict__[slot] = Binding(key, bind(op, *constants), constants)
    return cached.fn
