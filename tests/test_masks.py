"""Mask discovery from every source, precedence, and the errors bad masks and weights raise."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

from sparsecc import MaskError, SparseccWarning, WeightError
from sparsecc.capture.masks import prepare


def mlp():
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()


def test_zeros_are_the_mask_by_default():
    model = mlp()
    with torch.no_grad():
        model[0].weight[:, :4] = 0
    p = prepare(model)
    assert p.layers["0.weight"].source == "zeros"
    assert torch.equal(p.layers["0.weight"].mask, model[0].weight != 0)
    assert p.layers["2.weight"].mask.all()


def test_prune_hooks():
    model = mlp()
    mask = torch.rand(6, 8) > 0.5
    prune.custom_from_mask(model[0], "weight", mask)
    p = prepare(model)
    assert p.layers["0.weight"].source == "prune"
    assert torch.equal(p.layers["0.weight"].mask, mask)
    ref0 = p.reference[0]
    assert isinstance(ref0.weight, nn.Parameter) and not hasattr(ref0, "weight_orig")
    assert torch.equal(ref0.weight, model[0].weight_orig.detach() * mask)
    assert hasattr(model[0], "weight_orig"), "the user's model must not be modified"


def test_prune_mask_is_kept_even_where_the_weight_is_zero():
    model = mlp()
    with torch.no_grad():
        model[0].weight.zero_()
    prune.custom_from_mask(model[0], "weight", torch.ones(6, 8))
    assert prepare(model).layers["0.weight"].mask.all()


def test_parametrization_mask():
    model = mlp()
    mask = torch.rand(4, 6) > 0.3
    parametrize.register_parametrization(model[2], "weight", FakeSparsity(mask))
    p = prepare(model)
    assert p.layers["2.weight"].source == "parametrize"
    assert torch.equal(p.layers["2.weight"].mask, mask)
    assert not parametrize.is_parametrized(p.reference[2])
    assert torch.equal(p.reference[2].weight, model[2].parametrizations.weight.original.detach() * mask)


def test_explicit_masks_win_over_hooks():
    model = mlp()
    prune.custom_from_mask(model[0], "weight", torch.ones(6, 8))
    mask = torch.eye(6, 8, dtype=torch.bool)
    p = prepare(model, masks={"0.weight": mask})
    assert p.layers["0.weight"].source == "masks="
    assert torch.equal(p.layers["0.weight"].mask, mask)
    assert torch.equal(p.reference[0].weight != 0, mask & (model[0].weight_orig != 0))


def test_float_binary_mask_accepted():
    p = prepare(mlp(), masks={"0.weight": torch.eye(6, 8)})
    assert p.layers["0.weight"].mask.dtype == torch.bool


def test_mask_shape_mismatch():
    with pytest.raises(MaskError, match=r"0\.weight: mask shape \(8, 6\) != weight shape \(6, 8\)"):
        prepare(mlp(), masks={"0.weight": torch.ones(8, 6, dtype=torch.bool)})


def test_non_binary_mask():
    with pytest.raises(MaskError, match=r"0\.weight: mask holds values other than 0 and 1 \(e\.g\. 0\.5\)"):
        prepare(mlp(), masks={"0.weight": torch.full((6, 8), 0.5)})


def test_unknown_mask_name():
    with pytest.raises(MaskError, match=r"fc9\.weight.*use parameter names such as 0\.weight"):
        prepare(mlp(), masks={"fc9.weight": torch.ones(1)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight(bad):
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 2] = bad
    with pytest.raises(WeightError, match=r"^2: weight holds 1 NaN/Inf value\(s\); fix the checkpoint"):
        prepare(model)


def test_train_mode_compiles_an_eval_copy():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    with pytest.warns(SparseccWarning, match="train mode: sparsecc compiles an eval\\(\\) copy"):
        p = prepare(model)
    assert p.was_training and not p.reference.training and model.training


def test_tied_weights_are_marked_and_untied_in_the_reference():
    model = mlp()
    model.add_module("3", nn.Linear(8, 6))
    model[3].weight = model[0].weight
    prune.custom_from_mask(model[3], "weight", torch.rand(6, 8) > 0.5)
    p = prepare(model)
    assert p.layers["0.weight"].shared_with == ("3.weight",)
    assert p.layers["3.weight"].shared_with == ("0.weight",)
    ref = p.reference
    assert ref[0].weight is not ref[3].weight
    assert torch.equal(ref[0].weight, model[0].weight), "the plain use must keep the unmasked tensor"
    assert torch.equal(ref[3].weight, model[3].weight), "the pruned use is masked"


def test_no_warning_for_plain_eval_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(mlp())


def test_explicit_mask_on_a_parametrized_weight_applies_both_in_the_user_copy():
    model = mlp()
    param_mask = torch.rand(6, 8) > 0.3
    explicit = torch.rand(6, 8) > 0.5
    parametrize.register_parametrization(model[0], "weight", FakeSparsity(param_mask))
    p = prepare(model, {"0.weight": explicit})
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model[2](torch.relu(F.linear(x, model[0].parametrizations.weight.original * param_mask * explicit,
                                            model[0].bias)))
        torch.testing.assert_close(p.user(x), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p.reference(x), want, rtol=1e-6, atol=1e-6)
