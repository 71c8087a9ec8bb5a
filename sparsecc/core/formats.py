"""Condensed storage formats: encode a masked weight, decode it back (for reference kernels and checks).

Fan-in: ``values[R, k]`` and row-sorted ``indices[R, k]`` (int16 when the fan-in fits, else int32) for the R
kept rows, plus ``rows[R]`` (int64 output positions) when some rows are ablated.
2:4: ``values[out, in/2]`` and ``metadata[out, ceil(in/8)]`` uint8, two groups of 4 per byte (low nibble
first), each nibble holding the two kept positions ``p0 | p1 << 2`` with ``p0 < p1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from sparsecc.core import reductions

INT16_LIMIT = 32767


def index_dtype(fan_in: int) -> torch.dtype:
    return torch.int16 if fan_in <= INT16_LIMIT else torch.int32


@dataclass(frozen=True)
class FanIn:
    values: Tensor
    indices: Tensor
    rows: Optional[Tensor]


def encode_fanin(weight2d: Tensor, mask2d: Tensor, k: int) -> FanIn:
    """Condense the rows of ``mask2d`` that have ``k`` non-zeros; all-zero rows are dropped."""
    counts = reductions.row_counts(mask2d)
    live = counts > 0
    if bool(((counts != k) & live).any()):
        raise ValueError(f"mask is not constant fan-in {k}")
    kept = mask2d[live]
    # nonzero() walks row-major, so each row's indices come out sorted.
    cols = torch.nonzero(kept)[:, 1].reshape(kept.shape[0], k)
    values = torch.gather(weight2d[live], 1, cols).contiguous()
    rows = None if bool(live.all()) else torch.nonzero(live).flatten().to(torch.int64)
    return FanIn(values, cols.to(index_dtype(mask2d.shape[1])).contiguous(), rows)


def decode_fanin(values: Tensor, indices: Tensor, rows: Optional[Tensor], out_features: int,
                 in_features: int) -> Tensor:
    """The dense ``[out_features, in_features]`` weight a fan-in encoding stands for."""
    kept = values.new_zeros(values.shape[0], in_features).scatter_(1, indices.long(), values)
    if rows is None:
        return kept
    return values.new_zeros(out_features, in_features).index_copy_(0, rows, kept)


# The six ways to keep 2 of 4, as (p0, p1) with p0 < p1, indexed by nibble value p0 | p1 << 2.
_PAIRS = [(a, b) for b in range(4) for a in range(b)]


def encode_nm(weight2d: Tensor, mask2d: Tensor) -> tuple[Tensor, Tensor]:
    """2:4 along dim 1: values of the 2 kept positions of each group of 4, and their packed positions."""
    out, inp = mask2d.shape
    groups = mask2d.reshape(out, inp // 4, 4)
    if bool((groups.sum(-1) > 2).any()):
        raise ValueError("mask has a group of 4 with more than 2 non-zeros")
    # Fill groups with fewer than 2 kept weights with the first unkept positions: their values are 0.
    order = torch.sort((~groups).to(torch.int8) * 4 + torch.arange(4, dtype=torch.int8), dim=-1).indices[..., :2]
    pos = torch.sort(order, dim=-1).values
    values = torch.gather(weight2d.reshape(out, inp // 4, 4), 2, pos) * torch.gather(groups, 2, pos)
    nibble = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)
    if nibble.shape[1] % 2:
        nibble = torch.cat([nibble, nibble.new_zeros(out, 1)], dim=1)
    metadata = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return values.reshape(out, inp // 2).contiguous(), metadata.contiguous()


def nm_indices(metadata: Tensor, in_features: int) -> Tensor:
    """Absolute input positions ``[out, in/2]`` (int64) of the values of a 2:4 encoding."""
    groups = in_features // 4
    nib = torch.stack([metadata & 0xF, metadata >> 4], dim=-1).reshape(metadata.shape[0], -1)[:, :groups].long()
    pos = torch.stack([nib & 3, nib >> 2], dim=-1)
    base = torch.arange(groups, device=metadata.device).mul_(4).view(1, groups, 1)
    return (pos + base).reshape(metadata.shape[0], groups * 2)
