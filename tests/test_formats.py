"""Encodings: exact round trips and the documented bit layout."""

import pytest
import torch

from sparsecc.core import formats
from sparsecc.tooling.synthetic import fanin_mask, nm_mask


def test_fanin_encoding_exact():
    w = torch.tensor([[0.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 7.0, 0.0]])
    mask = w != 0
    enc = formats.encode_fanin(w, mask, 2)
    assert enc.values.tolist() == [[2.0, 3.0], [5.0, 7.0]]
    assert enc.indices.tolist() == [[1, 3], [0, 2]]
    assert enc.indices.dtype == torch.int16
    assert enc.rows.tolist() == [0, 2]
    assert torch.equal(formats.decode_fanin(enc.values, enc.indices, enc.rows, 3, 4), w)


def test_fanin_keeps_masked_in_zero_weights():
    w = torch.tensor([[0.0, 1.0, 0.0]])
    enc = formats.encode_fanin(w, torch.tensor([[True, True, False]]), 2)
    assert enc.values.tolist() == [[0.0, 1.0]] and enc.indices.tolist() == [[0, 1]]
    assert enc.rows is None


def test_int32_indices_when_fanin_exceeds_int16():
    assert formats.index_dtype(32767) == torch.int16
    assert formats.index_dtype(32768) == torch.int32


def test_fanin_rejects_varying_rows():
    with pytest.raises(ValueError):
        formats.encode_fanin(torch.ones(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool), 2)


def test_nm_encoding_bit_layout():
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    mask = torch.tensor([[0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    values, meta = formats.encode_nm(w * mask, mask)
    assert values.tolist() == [[2.0, 4.0, 5.0, 7.0]]
    # group 0 keeps (1, 3) -> 1 | 3 << 2 = 13; group 1 keeps (0, 2) -> 0 | 2 << 2 = 8; packed low nibble first.
    assert meta.tolist() == [[13 | (8 << 4)]]
    assert formats.nm_indices(meta, 8).tolist() == [[1, 3, 4, 6]]


def test_nm_group_with_one_kept_pads_with_zero():
    w = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    values, meta = formats.encode_nm(w, w != 0)
    idx = formats.nm_indices(meta, 4)
    dense = torch.zeros(1, 4).scatter_(1, idx, values)
    assert torch.equal(dense, w)


@pytest.mark.parametrize("shape", [(16, 64), (5, 12), (7, 36)])
def test_round_trips_random(shape):
    w = torch.randn(shape)
    mask = fanin_mask(w, 0.75, ablate=0.2)
    k = int(mask.sum(1).max())
    enc = formats.encode_fanin(w * mask, mask, k)
    assert torch.equal(formats.decode_fanin(enc.values, enc.indices, enc.rows, *shape), w * mask)
    nm = nm_mask(w)
    values, meta = formats.encode_nm(w * nm, nm)
    assert torch.equal(torch.zeros(shape).scatter_(1, formats.nm_indices(meta, shape[1]), values), w * nm)
