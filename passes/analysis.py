"""Structure analysis: classify each weight mask as one `Structure`, and say why when it cannot be condensed.

Every analyser has the signature ``(fqn, mask) -> Structure | None`` and looks at the mask only; `ANALYSERS`
runs them in order and the first answer wins. Linear masks are ``[out, in]``; Conv2d masks ``[F, C/g, R, S]``
whose fan-in is the flattened ``C/g*R*S`` of each filter and whose 2:4 axis is C (as TensorRT reads it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sparsecc.passes.structures import NM, ChannelStructured, ConstantFanIn, Dense, Structure, Unstructured

log = logging.getLogger("sparsecc")

#: A 2:4 mask keeps about half; sparser masks that happen to fit 2:4 condense better as constant fan-in.
NM_MIN_DENSITY = 0.375


@dataclass(frozen=True)
class Analysis:
    structure: Structure
    density: float
    reason: str = ""            # why a layer is left as it is; empty when it can be condensed


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1)


def _ablated(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(r) for r in torch.nonzero(~_rows(mask).any(dim=1)).flatten())


def _groups_along_k(mask: torch.Tensor, m: int) -> Optional[torch.Tensor]:
    """Counts of non-zeros in every group of ``m`` along K (Linear: in; Conv2d: C), None if K % m != 0."""
    k_last = mask if mask.dim() == 2 else mask.permute(0, 2, 3, 1)
    if k_last.shape[-1] % m:
        return None
    return k_last.reshape(*k_last.shape[:-1], -1, m).sum(dim=-1)


def dense(fqn: str, mask: torch.Tensor) -> Optional[Structure]:
    return Dense() if bool(mask.all()) else None


def n_m(fqn: str, mask: torch.Tensor) -> Optional[Structure]:
    counts = _groups_along_k(mask, 4)
    if counts is None or mask.float().mean() < NM_MIN_DENSITY:
        return None
    return NM(2, 4, axis=1) if bool((counts <= 2).all()) else None


def channels(fqn: str, mask: torch.Tensor) -> Optional[Structure]:
    per_channel = mask.transpose(0, 1).reshape(mask.shape[1], -1).any(dim=1)
    if bool(per_channel.all()):
        return None
    ablated = _ablated(mask)
    live = torch.ones(mask.shape[0], dtype=torch.bool)
    live[list(ablated)] = False
    kept = mask[live][:, per_channel]
    if kept.numel() == 0 or not bool(kept.all()):
        return None
    return ChannelStructured(tuple(int(c) for c in torch.nonzero(per_channel).flatten()), ablated)


def constant_fanin(fqn: str, mask: torch.Tensor) -> Optional[Structure]:
    counts = _rows(mask).sum(dim=1)
    live = counts[counts > 0]
    if live.numel() and bool((live == live[0]).all()):
        return ConstantFanIn(int(live[0]), _ablated(mask))
    if live.numel() == 0:
        return ConstantFanIn(0, _ablated(mask))
    return None


#: Analysers in precedence order: 2:4 before fan-in (an exact 2:4 mask is also constant fan-in, and the
#: 2:4 form is what TensorRT accelerates), channels before fan-in (the same holds for whole-channel masks).
ANALYSERS: tuple[Callable[[str, torch.Tensor], Optional[Structure]], ...] = (dense, n_m, channels, constant_fanin)


def _why_unstructured(mask: torch.Tensor) -> str:
    counts = _rows(mask).sum(dim=1)
    live_rows = torch.nonzero(counts > 0).flatten()
    live = counts[live_rows]
    values, freq = torch.unique(live, return_counts=True)
    common = int(values[freq.argmax()])
    odd = live_rows[live != common]
    first = int(odd[0])
    if odd.numel() == 1:
        why = f"row {first} has fan-in {int(counts[first])}, the others {common}"
    else:
        why = (f"fan-in varies from {int(live.min())} to {int(live.max())}: {odd.numel()} of {live.numel()} "
               f"rows differ from the most common {common} (row {first} has {int(counts[first])})")
    density = float(mask.float().mean())
    if abs(density - 0.5) < 0.1:
        groups = _groups_along_k(mask, 4)
        k_dim = mask.shape[1]
        if groups is None:
            why += f"; not 2:4: {'in_features' if mask.dim() == 2 else 'channels'} {k_dim} is not a multiple of 4"
        else:
            over = torch.nonzero(groups > 2)
            if over.numel():
                bad = over[0].tolist()
                why += f"; not 2:4: row {bad[0]}, group {bad[-1]} along K has {int(groups[tuple(bad)])} non-zeros"
            along_out = _groups_along_k(mask.transpose(0, 1), 4) if mask.dim() == 2 else None
            if along_out is not None and bool((along_out <= 2).all()):
                why += " (it is 2:4 along the output axis; sparsecc and TensorRT need it along K)"
    return why


def analyse(fqn: str, mask: torch.Tensor) -> Analysis:
    """The structure of one weight mask, with the reason when it will be left alone."""
    density = float(mask.float().mean()) if mask.numel() else 1.0
    for analyser in ANALYSERS:
        structure = analyser(fqn, mask)
        if structure is not None:
            reason = "no zeros in the mask" if isinstance(structure, Dense) else ""
            break
    else:
        structure, reason = Unstructured(density), _why_unstructured(mask)
    log.info("%s %s: %s%s", fqn, tuple(mask.shape), structure, f" ({reason})" if reason else "")
    return Analysis(structure, density, reason)
