"""The fast mask reductions return what torch's plain forms return, on every shape the analysis sees."""

from __future__ import annotations

import pytest
import torch

from sparsecc.core import reductions
from sparsecc.planning.narrow import _even_fan_in

SHAPES = [(7, 13), (1, 1), (16, 3, 3, 3), (5, 4, 1, 1), (0, 4), (4, 0), (3, 2, 0, 3)]


def _masks(shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    yield torch.zeros(shape, dtype=torch.bool)
    yield torch.ones(shape, dtype=torch.bool)
    for p in (0.05, 0.5, 0.95):
        yield torch.rand(shape, generator=g) < p
    if len(shape) == 2 and shape[0] > 1:
        m = torch.rand(shape, generator=g) < 0.5
        m[1] = False                                   # an ablated row
        yield m
        yield (torch.rand(shape[::-1], generator=g) < 0.5).t()   # non-contiguous


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reductions_match_torch(shape):
    for mask in _masks(shape):
        assert reductions.all_set(mask) == bool(mask.all())
        rows = mask.flatten(1)
        live = reductions.live_rows(mask)
        assert live.dtype == torch.bool and live.shape == (mask.shape[0],)
        assert torch.equal(live, rows.any(1) if rows.shape[1] else torch.zeros(mask.shape[0], dtype=torch.bool))
        counts = reductions.row_counts(mask)
        assert torch.equal(counts.long(), rows.sum(1))
        used = reductions.used_inputs(mask)
        expected = mask.transpose(0, 1).reshape(mask.shape[1], -1).any(1) if mask.numel() else \
            torch.zeros(mask.shape[1], dtype=torch.bool)
        assert used.dtype == torch.bool and torch.equal(used, expected)
        assert reductions.count(mask) == int(mask.sum())
        assert reductions.density(mask) == (int(mask.sum()) / mask.numel() if mask.numel() else 1.0)


def test_non_bool_masks_read_as_nonzero():
    m = torch.tensor([[0.0, 2.0], [0.0, -0.0]])
    assert torch.equal(reductions.live_rows(m), torch.tensor([True, False]))
    assert not reductions.all_set(m) and reductions.count(m) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite(dtype):
    big = torch.finfo(dtype).max
    assert reductions.all_finite(torch.randn(100, 7).to(dtype))
    assert reductions.all_finite(torch.full((64,), big, dtype=dtype))       # the sum overflows; the values don't
    assert reductions.all_finite(torch.empty(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(50, 3).to(dtype)
        t[17, 1] = bad
        assert not reductions.all_finite(t)
    both = torch.tensor([float("inf"), -float("inf")], dtype=dtype)       # the sum is NaN, not Inf
    assert not reductions.all_finite(both)
    assert reductions.all_finite(torch.tensor([1, 2, 3]))                   # integers are finite


def test_even_fan_in_pads_short_rows_with_the_first_unused_zero_weights():
    torch.manual_seed(0)
    mask = torch.rand(9, 20) < 0.4
    mask[2] = False                                   # ablated: stays empty
    weight = torch.randn(9, 20) * mask
    weight[4, 0] = 0.0                                # a masked-in zero still counts as masked in
    out = _even_fan_in(mask, weight)
    counts = out.sum(1)
    k = int(mask.sum(1).max())
    assert int(counts[2]) == 0
    assert bool(((counts == k) | (counts == 0)).all())
    assert bool((out | ~mask).all())                  # nothing taken away
    for r in range(9):                                # the added entries are the row's first free positions
        free = torch.nonzero(~mask[r] & (weight[r] == 0)).flatten()
        need = k - int(mask[r].sum()) if mask[r].any() else 0
        added = torch.nonzero(out[r] & ~mask[r]).flatten()
        assert torch.equal(added, free[:need])
