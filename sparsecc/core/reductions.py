"""Reductions over boolean masks and weights, in the forms torch runs fast on one thread.

Compile time goes mostly into looking at masks: every detector, the narrowing pass and the encoders reduce every
layer's mask (ViT-B/16: 48 masks of 0.6-2.4 M entries, each reduced several times). torch reduces ``bool``
tensors slowly on one thread and the same bytes read as ``uint8`` fast (measured on a Xeon, one 3072x768 mask:
``any(1)`` 6.7 ms, ``uint8.amax(1)`` 0.16 ms; ``sum(1)`` 4.7 ms, ``sum(1, dtype=int32)`` 1.1 ms; an elementwise
``isfinite(w).all()`` 8.9 ms, ``w.sum()`` 0.5 ms). Each helper returns what the slow form would; the tests
compare them on random, empty and edge-case masks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bytes(mask: Tensor) -> Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def all_set(mask: Tensor) -> bool:
    """``bool(mask.all())`` (True for an empty mask, as torch says)."""
    return mask.numel() == 0 or bool(_bytes(mask).amin())


def live_rows(mask: Tensor) -> Tensor:
    """Per row (dim 0) whether any entry of the rest is set: ``mask.reshape(rows, -1).any(1)``."""
    rows = _bytes(mask).flatten(1)
    if rows.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    return rows.amax(1).bool()


def used_inputs(mask: Tensor) -> Tensor:
    """Per input channel (dim 1) whether any row uses it at any kernel position: ``mask.any((0, 2, 3, ...))``."""
    if mask.shape[0] == 0 or mask.numel() == 0:
        return torch.zeros(mask.shape[1], dtype=torch.bool, device=mask.device)
    return _bytes(mask).amax(dim=(0, *range(2, mask.dim()))).bool()


def row_counts(mask: Tensor) -> Tensor:
    """Set entries per row (dim 0) over the rest, as int32: ``mask.reshape(rows, -1).sum(1)``."""
    return _bytes(mask).flatten(1).sum(1, dtype=torch.int32)


def count(mask: Tensor) -> int:
    return int(torch.count_nonzero(mask))


def density(mask: Tensor) -> float:
    """The fraction of entries set (1.0 for an empty mask: nothing is pruned)."""
    return count(mask) / mask.numel() if mask.numel() else 1.0


def all_finite(t: Tensor) -> bool:
    """``bool(torch.isfinite(t).all())`` by one sum: any NaN or Inf makes the sum non-finite, and a sum of
    finite values is finite unless it overflows, which sends it to the exact elementwise check."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(t).all())
