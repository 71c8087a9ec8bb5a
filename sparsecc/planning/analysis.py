"""Structure analysis: classify each weight mask as one `Structure`, and say why when it cannot be condensed.

Every detector has the signature ``(fqn, mask) -> Structure | None`` and looks at the mask only; `analysers`
lists them in order (dense, then the registered patterns, `sparsecc.core.patterns`) and the first answer wins.
Linear masks are ``[out, in]``; Conv2d masks ``[F, C/g, R, S]`` whose fan-in is the flattened ``C/g*R*S`` of
each filter and whose 2:4 axis is C (as TensorRT reads it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sparsecc.core import patterns, reductions
from sparsecc.core.structures import Dense, Structure, Unstructured

log = logging.getLogger("sparsecc")


@dataclass(frozen=True)
class Analysis:
    structure: Structure
    density: float
    reason: str = ""            # why a layer is left as it is; empty when it can be condensed


def dense(fqn: str, mask: torch.Tensor) -> Optional[Structure]:
    return Dense() if reductions.all_set(mask) else None


def analysers() -> tuple[Callable[[str, torch.Tensor], Optional[Structure]], ...]:
    """Detectors in precedence order: dense first, then the registered patterns in their table's order (2:4
    before fan-in: an exact 2:4 mask is also constant fan-in, and the 2:4 form is what TensorRT accelerates;
    channels before fan-in, for the same reason)."""
    return (dense, *(p.detect for p in patterns.PATTERNS))


def _why_unstructured(mask: torch.Tensor) -> str:
    """Every pattern's near-miss explanation, the most general pattern's first."""
    return "; ".join(filter(None, (p.explain(mask) for p in reversed(patterns.PATTERNS) if p.explain)))


def analyse(fqn: str, mask: torch.Tensor) -> Analysis:
    """The structure of one weight mask, with the reason when it will be left alone."""
    density = reductions.density(mask)
    for analyser in analysers():
        structure = analyser(fqn, mask)
        if structure is not None:
            reason = "no zeros in the mask" if isinstance(structure, Dense) else ""
            break
    else:
        structure, reason = Unstructured(density), _why_unstructured(mask)
    log.info("%s %s: %s%s", fqn, tuple(mask.shape), structure, f" ({reason})" if reason else "")
    return Analysis(structure, density, reason)
