"""The reference runtime's kernels against the dense masked torch ops, across shapes, k, ablation, bias,
token counts (both the gather and the scatter path), index widths and conv parameters."""

import pytest
import torch
import torch.nn.functional as F

from sparsecc.core import formats
from sparsecc.core.patterns import fanin
from sparsecc.tooling.synthetic import fanin_mask, nm_mask
from tests.conftest import assert_equivalent


def _fanin(w, sparsity, ablate):
    mask = fanin_mask(w, sparsity, ablate)
    rows = mask.reshape(mask.shape[0], -1)
    k = int(rows.sum(1).max())
    return mask, formats.encode_fanin((w * mask).reshape(rows.shape), rows, k)


@pytest.mark.parametrize("out_f,in_f,sparsity,ablate", [(32, 64, 0.9, 0.0), (30, 37, 0.5, 0.2), (7, 5, 0.2, 0.3),
                                                         (48, 100, 0.97, 0.5)])
@pytest.mark.parametrize("tokens", [(1,), (3,), (2, 17)])
@pytest.mark.parametrize("bias", [True, False])
def test_condensed_linear(out_f, in_f, sparsity, ablate, tokens, bias):
    w = torch.randn(out_f, in_f)
    mask, enc = _fanin(w, sparsity, ablate)
    b = torch.randn(out_f) if bias else None
    x = torch.randn(*tokens, in_f)
    y = torch.ops.sparsecc.condensed_linear(x, enc.values, enc.indices, enc.rows, b, out_f, "reference")
    assert_equivalent(y, F.linear(x, w * mask, b))


def test_both_paths_agree_around_the_threshold():
    w = torch.randn(16, 40)
    mask, enc = _fanin(w, 0.8, 0.25)
    for tokens in (fanin.GATHER_MAX_TOKENS, fanin.GATHER_MAX_TOKENS + 1):
        x = torch.randn(tokens, 40)
        assert_equivalent(fanin.linear_reference(x, enc.values, enc.indices, enc.rows, None, 16),
                          F.linear(x, w * mask))


def test_int32_indices():
    w = torch.randn(4, 10)
    mask, enc = _fanin(w, 0.5, 0.0)
    x = torch.randn(2, 10)
    y = torch.ops.sparsecc.condensed_linear(x, enc.values, enc.indices.to(torch.int32), None, None, 4, "reference")
    assert_equivalent(y, F.linear(x, w * mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    w = torch.randn(12, 24)
    mask, enc = _fanin(w, 0.75, 0.0)
    x = torch.randn(3, 24)
    y = torch.ops.sparsecc.condensed_linear(x.to(dtype), enc.values.to(dtype), enc.indices, None, None, 12, "reference")
    assert_equivalent(y, F.linear(x.to(dtype), (w * mask).to(dtype)))


def test_all_rows_ablated_outputs_bias():
    x = torch.randn(3, 6)
    b = torch.randn(4)
    y = torch.ops.sparsecc.condensed_linear(x, torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.int16),
                             torch.zeros(0, dtype=torch.int64), b, 4, "reference")
    assert_equivalent(y, b.expand(3, 4).clone())


@pytest.mark.parametrize("tokens", [1, 20])
def test_nm_linear(tokens):
    w = torch.randn(24, 64)
    mask = nm_mask(w)
    values, meta = formats.encode_nm(w * mask, mask)
    b = torch.randn(24)
    x = torch.randn(tokens, 64)
    assert_equivalent(torch.ops.sparsecc.nm_linear(x, values, meta, b, 64, "reference"), F.linear(x, w * mask, b))


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups", [
    (8, 16, 3, 1, 1, 1, 1), (8, 16, 3, 2, 1, 1, 2), (12, 12, 3, 1, 1, 1, 12), (6, 10, 1, 1, 0, 1, 1),
    (4, 8, 5, 2, 2, 2, 1), (16, 8, (3, 1), (1, 2), (1, 0), 1, 4)])
@pytest.mark.parametrize("batch", [1, 2])
def test_condensed_conv2d(cin, cout, k, stride, padding, dilation, groups, batch):
    conv = torch.nn.Conv2d(cin, cout, k, stride, padding, dilation, groups)
    mask, enc = _fanin(conv.weight.detach(), 0.6, 0.25)
    w = conv.weight.detach() * mask
    x = torch.randn(batch, cin, 11, 13)
    two = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
    y = torch.ops.sparsecc.condensed_conv2d(x, enc.values, enc.indices, enc.rows, conv.bias.detach(), cout,
                             list(conv.kernel_size), two(stride), two(padding), two(dilation), groups, "reference")
    assert_equivalent(y, F.conv2d(x, w, conv.bias.detach(), stride, padding, dilation, groups))


def test_smoke_command_passes():
    from sparsecc.tooling.smoke import smoke

    assert smoke("reference") == []
