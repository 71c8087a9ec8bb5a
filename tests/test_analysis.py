"""Structure analysis on tiny hand-written masks with exact answers."""

import pytest
import torch

from sparsecc.core.structures import NM, ChannelStructured, ConstantFanIn, Dense, Unstructured
from sparsecc.planning.analysis import analyse


def m(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_dense():
    a = analyse("l.weight", torch.ones(3, 4, dtype=torch.bool))
    assert a.structure == Dense()
    assert a.reason == "no zeros in the mask"


def test_constant_fanin_with_ablated_rows():
    mask = m([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    a = analyse("l.weight", mask)
    assert a.structure == ConstantFanIn(2, (1, 3))
    assert a.reason == ""
    assert a.density == pytest.approx(4 / 20)


def test_fanin_off_by_one_names_the_row():
    mask = m([[1, 0, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
    a = analyse("l.weight", mask)
    assert a.structure == Unstructured(9 / 24)
    assert a.reason == "row 2 has fan-in 3, the others 2"


def test_fanin_varies_over_many_rows():
    mask = m([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]])
    a = analyse("l.weight", mask)
    assert isinstance(a.structure, Unstructured)
    assert "fan-in varies from 1 to 3: 2 of 4 rows differ from the most common 1 (row 1 has 2)" in a.reason


def test_two_four_along_k_wins_over_constant_fanin():
    # Every group of 4 along K keeps exactly 2: also constant fan-in 4; 2:4 takes precedence.
    mask = m([[1, 1, 0, 0, 0, 1, 0, 1], [0, 1, 1, 0, 1, 0, 1, 0]])
    assert analyse("l.weight", mask).structure == NM(2, 4, axis=1)


def test_two_four_with_a_short_group_is_still_nm():
    mask = m([[1, 0, 0, 0, 0, 1, 0, 1], [0, 1, 1, 0, 1, 0, 1, 0]])
    assert analyse("l.weight", mask).structure == NM(2, 4, axis=1)


def test_sparse_mask_that_fits_two_four_is_fanin():
    # 1 of 4 everywhere fits "at most 2 of 4" but condenses better as fan-in 2.
    mask = m([[1, 0, 0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0, 1]])
    assert analyse("l.weight", mask).structure == ConstantFanIn(2, ())


def test_two_four_along_output_axis_is_explained():
    # 2:4 down each column (output axis) but 3 of 4 in row 0 along K; rows have different fan-in.
    mask = m([[1, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 0]])
    a = analyse("l.weight", mask)
    assert isinstance(a.structure, Unstructured)
    assert "not 2:4: row 0, group 0 along K has 3 non-zeros" in a.reason
    assert "2:4 along the output axis" in a.reason


def test_in_features_not_multiple_of_four_is_explained():
    mask = m([[1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1], [1, 1, 0, 0, 0, 0]])
    a = analyse("l.weight", mask)
    assert isinstance(a.structure, Unstructured)
    assert "in_features 6 is not a multiple of 4" in a.reason


def test_channel_structured_with_ablated_row():
    mask = m([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert analyse("l.weight", mask).structure == ChannelStructured((0, 2), (1,))


def test_conv_fanin_over_flattened_filter_with_groups():
    # 4 filters, 2 input channels per group, 3x3: each filter keeps 5 of 18, one filter ablated.
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    for f, taps in enumerate([(0, 3, 8, 10, 17), (), (1, 2, 9, 11, 12), (4, 5, 6, 7, 16)]):
        mask[f].view(-1)[list(taps)] = True
    assert analyse("c.weight", mask).structure == ConstantFanIn(5, (1,))


def test_conv_two_four_is_along_channels():
    # 8 channels at each of 2x2 taps: 2 of every 4 channels kept -> NM along C.
    mask = torch.zeros(2, 8, 2, 2, dtype=torch.bool)
    mask[:, [0, 3, 5, 6]] = True
    assert analyse("c.weight", mask).structure == NM(2, 4, axis=1)
    # The same count along the flattened R*S axis but not along C is not 2:4.
    other = torch.zeros(2, 8, 2, 2, dtype=torch.bool)
    other[:, :4, 0, :] = True
    assert not isinstance(analyse("c.weight", other).structure, NM)


def test_all_rows_ablated():
    a = analyse("l.weight", torch.zeros(3, 4, dtype=torch.bool))
    assert a.structure == ConstantFanIn(0, (0, 1, 2))
