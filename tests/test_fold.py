"""BatchNorm folding into condensed convolutions (`sparsecc.passes.fold`): folded where exact, left where not,
always equal to the masked reference end to end and per layer."""

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc.core.patterns.fanin import CondensedConv2d
from sparsecc.passes.fold import batchnorm_affine
from sparsecc.tooling import synthetic
from tests.conftest import assert_equivalent


def _bn(channels, **kwargs):
    bn = nn.BatchNorm2d(channels, **kwargs)
    if bn.running_mean is not None:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    if bn.weight is not None:
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    return bn


def _compile_and_check(model, backend="auto"):
    model.eval()
    masks = synthetic.fanin_masks(model, 0.75, 0.25)     # a quarter of the filters ablated
    x = torch.randn(2, 8, 12, 12)
    compiled = sparsecc.compile(model, x, masks=masks, backend=backend)
    assert compiled.report.validated and all(lay.error.ok for lay in compiled.report.condensed)
    with torch.no_grad():
        assert_equivalent(compiled(x), sparsecc.masked_reference(model, masks)(x))
    return compiled, masks


def _kinds(compiled):
    return [type(m).__name__ for m in compiled.module.modules()]


@pytest.mark.parametrize("backend", ["tvm", "reference"])
def test_batchnorms_after_condensed_convs_are_folded(backend):
    # with and without a conv bias; the in-place ReLU after a folded conv writes into the conv's own output
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), _bn(16), nn.ReLU(inplace=True),
                          nn.Conv2d(16, 16, 3, bias=False), _bn(16, affine=False))
    compiled, _ = _compile_and_check(model, backend)
    assert "BatchNorm2d" not in _kinds(compiled)
    assert "2 BatchNorm(s) folded into the condensed convolution before them: 1, 4" in compiled.report.notes


def test_folded_layer_checks_against_conv_then_batchnorm():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), _bn(16))
    compiled, masks = _compile_and_check(model)
    layer = next(m for m in compiled.module.modules() if isinstance(m, CondensedConv2d))
    x = torch.randn(1, 8, 12, 12)
    reference = sparsecc.masked_reference(model, masks)
    with torch.no_grad():
        expected = reference(x)
        assert_equivalent(layer.dense_op()(x, reference[0].weight, reference[0].bias), expected)
        assert_equivalent(layer(x), expected)
    scale, shift = batchnorm_affine(model[1])
    y = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        assert_equivalent(y * scale.view(-1, 1, 1) + shift.view(-1, 1, 1), model[1](y))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), _bn(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y          # the conv's output has a second user


class _SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), _bn(8)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))     # one BatchNorm module called twice


@pytest.mark.parametrize("model,why", [
    (_Residual, "the conv output has another user"),
    (lambda: nn.Sequential(nn.Conv2d(8, 8, 3), _bn(8, track_running_stats=False)), "batch statistics"),
    (_SharedNorm, "the BatchNorm is called twice"),
])
def test_batchnorms_that_cannot_fold_stay(model, why):
    compiled, _ = _compile_and_check(model())
    assert any(k.startswith("BatchNorm") for k in _kinds(compiled)), why
    assert not any("folded" in note for note in compiled.report.notes), why
