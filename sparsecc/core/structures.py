"""Sparsity structures: small frozen values, one per kind of pattern a weight mask can have.

They describe a mask, never hold tensors, so reports can print them and tests can compare them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Dense:
    """No zero in the mask."""

    def __str__(self) -> str:
        return "dense"


@dataclass(frozen=True)
class ConstantFanIn:
    """Every kept output row has exactly `k` non-zeros (for Conv2d over the flattened C/groups*R*S fan-in);
    rows listed in `ablated` are all zero (SRigL's ablated neurons)."""

    k: int
    ablated: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"fan-in k={self.k}" + (f", {len(self.ablated)} ablated" if self.ablated else "")


@dataclass(frozen=True)
class NM:
    """At most `n` non-zeros in every group of `m` consecutive weights along `axis` (1 = input/K)."""

    n: int = 2
    m: int = 4
    axis: int = 1

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" + ("" if self.axis == 1 else f" along axis {self.axis}")


@dataclass(frozen=True)
class ChannelStructured:
    """Whole input channels are zero; the `kept` ones are dense in every non-ablated row."""

    kept: tuple[int, ...]
    ablated: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"channels {len(self.kept)} kept" + (f", {len(self.ablated)} ablated" if self.ablated else "")


@dataclass(frozen=True)
class Unstructured:
    """Any other pattern; kept as it is."""

    density: float

    def __str__(self) -> str:
        return f"unstructured {self.density:.1%}"


Structure = Union[Dense, ConstantFanIn, NM, ChannelStructured, Unstructured]
