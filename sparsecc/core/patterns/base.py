"""The pattern registry: `Pattern` and `Op` records and the ordered table (`PATTERNS`) every stage reads.

A `Pattern` holds everything sparsecc does with one kind of mask: the `Structure` type its detector returns,
the explainer of near misses, the condense rule per layer kind, whether narrowing may remove a layer's inputs,
and the custom ops (`Op`) its condensed layers call: the torch.library op (schema and fake kernel), its
reference kernel, its TVM runtime binding and its TVM Relax converter. The TVM parts are named as
``"module:attribute"`` and imported on first use, so a pattern imports no TVM. Every stage (analysis, condense,
the runtimes, the exporters, narrowing) reads this table; none spells an op name or dispatches on a pattern's
types. Adding a pattern: one module defining its `Pattern`, and a `register` call (see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from sparsecc.core.structures import Structure


class NotCondensable(Exception):
    """A rule's refusal; the message is the reason shown in the report."""


@dataclass(frozen=True)
class Source:
    """What a rule needs: the layer (`sparsecc.capture.masks.Layer`), its analysis, its masked weight and bias,
    and the module that owned it."""

    layer: Any
    analysis: Any
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    owner: torch.nn.Module


@dataclass(frozen=True)
class Op:
    """One ``sparsecc::`` custom op. ``function`` is the registered torch.library op (its schema and fake kernel
    come with it); ``reference`` its pure-torch kernel, taking the op's arguments minus ``runtime``;
    Backends other than the reference name the ops they run in their own tables, by op name (the TVM runtime's
    `BINDINGS`, its library writer's `CONVERTERS`): a pattern names no backend. ``samples(generator,
    dtype)`` gives small cases ``(label, args without runtime, expected)``, the expectation computed by the dense
    torch op on the masked weight: the runtimes' smoke test and the conformance suite run them.
    ``densify(x, *constants)`` returns the op as its dense torch op on the decoded weight (a callable on the
    input), which the reference runtime's measured choice runs where it is faster than the reference kernel (a
    bf16 layer on an AMX CPU); ``tokens(x)`` is what the choice is bucketed by (rows of the last dimension for
    a Linear, output pixels for a convolution)."""

    name: str
    function: Callable
    reference: Callable
    samples: Callable[[torch.Generator, torch.dtype], list[tuple[str, tuple, torch.Tensor]]]
    densify: Optional[Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = None
    tokens: Callable[[torch.Tensor], int] = lambda x: x.numel() // max(x.shape[-1], 1) if x.dim() else 1


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``detect(fqn, mask)`` returns a ``structure`` instance or None; ``rules`` map a layer
    kind (``"linear"``, ``"conv2d"``) to the rule building its condensed module from a `Source` (raising
    `NotCondensable` with the reason); ``explain(mask)`` says why an unstructured mask is not this pattern
    (empty when it has nothing to say); ``narrows_inputs`` says whether narrowing may remove input columns of
    a layer with this pattern."""

    name: str
    structure: type
    detect: Callable[[str, torch.Tensor], Optional[Structure]]
    rules: Mapping[str, Callable[[Source], Any]]
    ops: tuple[Op, ...] = ()
    explain: Optional[Callable[[torch.Tensor], str]] = None
    narrows_inputs: bool = True


#: Registered patterns in precedence order: the first detector that answers wins.
PATTERNS: list[Pattern] = []
_changes = [0]      # bumped by `changed()`: views over the table rebuild only then


def register(pattern: Pattern, before: Optional[str] = None) -> None:
    """Add ``pattern`` to the table, at the end or just before the pattern named ``before`` (an exact 2:4 mask is
    also constant fan-in: the more specific pattern must come first)."""
    if any(p.name == pattern.name for p in PATTERNS):
        raise ValueError(f"pattern {pattern.name!r} is already registered")
    taken = {o.name for p in PATTERNS for o in p.ops} & {o.name for o in pattern.ops}
    if taken:
        raise ValueError(f"pattern {pattern.name!r}: op(s) {sorted(taken)} belong to another pattern")
    at = next(i for i, p in enumerate(PATTERNS) if p.name == before) if before is not None else len(PATTERNS)
    PATTERNS.insert(at, pattern)
    changed()


def unregister(name: str) -> None:
    PATTERNS[:] = [p for p in PATTERNS if p.name != name]
    changed()


def changed() -> None:
    """Make every `OpTable` rebuild on its next lookup: the pattern table, or a backend's own table of the ops
    it runs, changed."""
    _changes[0] += 1


@contextlib.contextmanager
def registered(pattern: Pattern, before: Optional[str] = None) -> Iterator[Pattern]:
    """``pattern`` in the table for the duration of the block."""
    register(pattern, before)
    try:
        yield pattern
    finally:
        unregister(pattern.name)


def ops() -> dict[str, Op]:
    """Every registered op by name."""
    return {o.name: o for p in PATTERNS for o in p.ops}


def op(name: str) -> Op:
    found = ops().get(name)
    if found is None:
        raise KeyError(f"no registered pattern defines the op sparsecc::{name}")
    return found


def of(structure: Structure) -> Optional[Pattern]:
    """The pattern whose detector produces ``structure`` (None for dense and unstructured masks)."""
    return next((p for p in PATTERNS if isinstance(structure, p.structure)), None)


class OpTable(Mapping[str, Callable]):
    """A live view of the registered ops as ``name -> kernel``, for runtime modules' ``KERNELS``: patterns
    registered later are seen without rebuilding anything. ``pick(op)`` gives the kernel or None."""

    def __init__(self, pick: Callable[[Op], Optional[Callable]]) -> None:
        self._pick = pick
        self._built: tuple[int, dict[str, Callable]] = (-1, {})

    def _kernels(self) -> dict[str, Callable]:
        if self._built[0] != _changes[0]:     # compiled graphs look a kernel up on every call: built once
            found = {name: self._pick(o) for name, o in ops().items()}
            self._built = (_changes[0], {name: k for name, k in found.items() if k is not None})
        return self._built[1]

    def __getitem__(self, name: str) -> Callable:
        return self._kernels()[name]

    def __iter__(self):
        return iter(self._kernels())

    def __len__(self) -> int:
        return len(self._kernels())
