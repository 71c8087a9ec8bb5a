"""Integration: torchvision models with random weights, SRigL-style and 2:4 masks, compiled and checked
against the masked original."""

import pytest
import torch

import sparsecc
from sparsecc.tooling import synthetic
from sparsecc.tooling.demo import build, sparse_model
from tests.conftest import assert_equivalent

pytestmark = pytest.mark.slow    # whole models: `make test` runs it, `make check` does not


def _check(model, compiled, x):
    with torch.no_grad():
        assert_equivalent(compiled(x), sparsecc.masked_reference(model)(x))


def test_resnet18_constant_fanin_with_ablation():
    model = sparse_model("resnet18", 0.9, 0.1)
    x = torch.randn(1, 3, 64, 64)
    compiled = sparsecc.compile(model, (x,), narrow=False)    # every condensed layer keeps its ablated rows
    report = compiled.report
    assert report.capture == "torch.fx"
    assert report.rewrites == {"condensed_conv2d": 19}        # all 20 convs but the stem
    stem = next(lay for lay in report.layers if lay.name == "conv1.weight")
    assert stem.action == "kept" and stem.reason == "no zeros in the mask"
    assert all(lay.ablated > 0 for lay in report.condensed)
    assert all(lay.error is not None and lay.error.ok for lay in report.condensed)
    # every BatchNorm but the stem's (after the dense conv1) is folded into its condensed convolution
    assert [type(m).__name__ for m in compiled.module.modules()].count("BatchNorm2d") == 1
    assert any(note.startswith("19 BatchNorm(s) folded") and "layer4.1.bn2" in note for note in report.notes)
    _check(model, compiled, torch.randn(2, 3, 64, 64))


def test_vit_b_16_constant_fanin_with_ablation():
    model = sparse_model("vit_b_16", 0.9, 0.05)
    x = torch.randn(1, 3, 224, 224)
    compiled = sparsecc.compile(model, (x,))
    report = compiled.report
    # 12 blocks x (in_proj, out_proj, mlp.0, mlp.3)
    assert report.rewrites == {"condensed_linear": 48}
    in_proj = [lay for lay in report.condensed if lay.name.endswith("in_proj_weight")]
    assert len(in_proj) == 12 and all(lay.positions == 197 for lay in in_proj)
    assert sum(lay.bytes_condensed for lay in report.layers) < 0.25 * sum(lay.bytes_dense for lay in report.layers)
    _check(model, compiled, torch.randn(2, 3, 224, 224))


def test_vit_b_16_two_four():
    model = build("vit_b_16")
    synthetic.attach_with_prune(model, synthetic.nm_masks(model, synthetic.vit_encoder))
    compiled = sparsecc.compile(model, (torch.randn(1, 3, 224, 224),))
    assert compiled.report.rewrites == {"nm_linear": 48}
    _check(model, compiled, torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_resnet18_two_four_convs(backend):
    model = build("resnet18")
    synthetic.attach_with_prune(model, synthetic.nm_masks(model, synthetic.all_but_stem))
    compiled = sparsecc.compile(model, (torch.randn(1, 3, 32, 32),), backend=backend)
    assert compiled.report.rewrites == {"condensed_conv2d": 19}
    assert {lay.structure for lay in compiled.report.condensed} == {"2:4"}
    assert compiled.report.runtime == ("tvm" if backend == "auto" else "reference")
    assert {lay.runtime for lay in compiled.report.condensed} == {compiled.report.runtime}
    _check(model, compiled, torch.randn(1, 3, 32, 32))
