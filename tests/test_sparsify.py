"""`sparsecc.sparsify` and SWAT top-K modules: masks of the promised structure, ERK budgets, permutations
that keep the function and at least the unpermuted magnitude, and models that compile to the masked
original."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sparsecc
from sparsecc import InputError, swat
from sparsecc.sparsify import _importance, _kept, erk_densities, search_permutation, sparsify
from sparsecc.tooling.demo import build
from sparsecc.tooling.synthetic import all_but_stem
from tests.conftest import assert_equivalent


def _unmasked(model: nn.Module) -> nn.Module:
    """The dense function under the masks: parametrizations removed, original weights back."""
    model = copy.deepcopy(model)
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
    return model


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": mod.parametrizations.weight[0].mask for name, mod in model.named_modules()
            if parametrize.is_parametrized(mod, "weight")}


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 24), nn.GELU(), nn.Linear(24, 8)).eval()
    nn.init.normal_(model[1].running_mean)
    nn.init.uniform_(model[1].running_var, 0.5, 2.0)
    nn.init.normal_(model[1].weight)
    return model


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_fanin_masks_have_constant_fan_in_and_compile(distribution):
    model = _conv_net()
    x = torch.randn(2, 4, 6, 6)
    report = sparsify(model, "fanin", sparsity=0.8, distribution=distribution, ablate=0.25)
    for fqn, mask in _masks(model).items():
        per_row = mask.reshape(mask.shape[0], -1).sum(1)
        live = per_row[per_row > 0]
        assert live.unique().numel() == 1, fqn                                  # constant fan-in
        assert int((per_row == 0).sum()) == round(0.25 * mask.shape[0]), fqn   # ablated neurons
    assert abs(report.density - 0.2 * 0.75) < 0.03
    compiled = sparsecc.compile(model, x)
    assert len(compiled.report.condensed) == 4
    with torch.no_grad():
        assert_equivalent(compiled(x), sparsecc.masked_reference(model)(x))


def test_ablation_drops_the_weakest_rows():
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[5.0] * 8, [0.1] * 8, [3.0] * 8, [0.2] * 8]))
    sparsify(nn.Sequential(layer), "fanin", sparsity=0.5, ablate=0.5)
    assert layer.parametrizations.weight[0].mask.sum(1).tolist() == [4, 0, 4, 0]


def test_erk_densities_meet_the_budget_and_cap_at_one():
    shapes = {"stem": (64, 3, 7, 7), "a": (64, 64, 3, 3), "b": (256, 512, 3, 3), "fc": (1000, 512)}
    numel = {n: torch.Size(s).numel() for n, s in shapes.items()}
    for density in (0.05, 0.1, 0.3, 0.8):
        d = erk_densities(shapes, density)
        assert sum(d[n] * numel[n] for n in shapes) == pytest.approx(density * sum(numel.values()), rel=1e-9)
        assert all(0 < v <= 1.0 for v in d.values())
        assert d["stem"] >= d["a"] >= d["b"]         # smaller, squatter layers keep more
    low = erk_densities(shapes, 0.05)
    assert low["stem"] > low["a"] > low["b"]
    assert erk_densities(shapes, 0.8)["stem"] == 1.0


@pytest.mark.slow
def test_two_four_masks_are_valid_along_k_for_every_layer():
    model = build("resnet18")
    x = torch.randn(1, 3, 32, 32)
    report = sparsify(model, "2:4", include=all_but_stem)
    masks = _masks(model)
    assert len(masks) == 19 and len(report.layers) == 19
    for fqn, mask in masks.items():
        groups = mask.permute(0, 2, 3, 1).reshape(-1, 4).sum(1)                 # along input channels
        assert bool((groups == 2).all()), fqn
    for layer in report.layers:     # equal up to summation order where only a layer's rows moved
        assert layer.kept_magnitude >= layer.kept_without_permutation * (1 - 1e-6), layer
    permuted = [lay for lay in report.layers if lay.permutation.startswith("with ")]
    assert permuted and all(lay.kept_magnitude > lay.kept_without_permutation for lay in permuted)
    compiled = sparsecc.compile(model, x)
    assert len(compiled.report.condensed) == 19
    with torch.no_grad():
        assert_equivalent(compiled(x), sparsecc.masked_reference(model)(x))


def test_permutation_keeps_the_function_before_pruning():
    model = _conv_net()
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        before = model(x)
    report = sparsify(model, "2:4")
    notes = {lay.fqn: lay.permutation for lay in report.layers}
    assert notes["3.weight"] == "with 0 via 1"           # through BatchNorm and ReLU, BN permuted too
    assert notes["8.weight"] == "with 6"
    assert notes["0.weight"].startswith("input not from")
    assert notes["6.weight"].startswith("input not from")  # after Flatten: channels are not features
    with torch.no_grad():
        assert_equivalent(_unmasked(model)(x), before)


def test_permutation_gains_on_a_constructed_case_and_never_loses():
    w = torch.tensor([[9.0, 9, 9, 9, 1, 1, 1, 1]])
    perm = search_permutation(w)
    assert float(_kept(_importance(w))) == 20.0 and float(_kept(_importance(w[:, perm]))) == 36.0
    torch.manual_seed(0)
    for _ in range(5):
        w = torch.randn(16, 32)
        assert float(_kept(_importance(w[:, search_permutation(w)])).sum()) >= float(_kept(_importance(w)).sum())


def test_bad_arguments_and_masked_layers_are_refused():
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(InputError, match="not a multiple of 4"):
        sparsify(model, "2:4")
    with pytest.raises(InputError, match="structure"):
        sparsify(model, "1:4")
    with pytest.raises(InputError, match="distribution"):
        sparsify(model, "fanin", distribution="gaussian")
    sparsify(model, "fanin", sparsity=0.5)
    with pytest.raises(InputError, match="already has a mask"):
        sparsify(model, "fanin", sparsity=0.5)


# -- SWAT ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("structured,condensed", [(True, 3), (False, 0)])
def test_swat_topk_modules_fold_into_static_masks(structured, condensed):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 5 * 5, 32),
                          nn.ReLU(), nn.Linear(32, 10)).eval()
    model = swat.swatify(dense, 0.25, structured=structured).eval()
    x = torch.randn(2, 8, 5, 5)
    compiled = sparsecc.compile(model, x, narrow=False)     # narrowing would make 5.weight constant fan-in
    layers = {lay.name: lay for lay in compiled.report.layers}
    assert {lay.mask_source for lay in layers.values()} == {"module"}
    assert len(compiled.report.condensed) == condensed
    if structured:    # the same number of input channels per filter: constant fan-in
        assert str(layers["0.weight"].structure) == "fan-in k=18"
    else:             # top-K over the whole layer: left alone, with the reason
        assert layers["0.weight"].action == "kept" and "fan-in varies" in layers["0.weight"].reason
    with torch.no_grad():
        assert_equivalent(compiled(x), model(x))    # the top-K forward itself, not a re-derived mask
    assert isinstance(model[0], swat.TopKConv2d)     # the user's model is untouched


def test_swat_structured_mask_keeps_the_strongest_channels_per_filter():
    conv = swat.TopKConv2d(4, 2, 1, density=0.5, structured=True)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 5, 2, 6], [7, 1, 8, 2]]).view(2, 4, 1, 1))
    assert conv.mask().view(2, 4).tolist() == [[False, True, False, True], [True, False, True, False]]
    with pytest.raises(InputError, match="density"):
        swat.TopKLinear(4, 4, density=0.0)


def test_users_own_sparsifying_module_folds_through_the_hook():
    class EveryOther(nn.Module):
        """A user's module: a Linear that only ever uses its first 4 input columns."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(8, 4)
            self.register_buffer("keep", (torch.arange(8) < 4).expand(4, 8).clone())

        def forward(self, x):
            return nn.functional.linear(x, self.inner.weight * self.keep, self.inner.bias)

        def sparsecc_fold(self):
            plain = copy.deepcopy(self.inner)
            plain.weight.mul_(self.keep)
            return plain, {"weight": self.keep}

    model = nn.Sequential(EveryOther(), nn.ReLU()).eval()
    x = torch.randn(3, 8)
    compiled = sparsecc.compile(model, x)
    layer = compiled.report.layers[0]
    assert (layer.name, layer.mask_source, str(layer.structure)) == ("0.weight", "module", "channels 4 kept")
    with torch.no_grad():
        assert_equivalent(compiled(x), model(x))


def test_inspect_shows_the_flop_and_byte_reduction_of_the_result():
    model = _conv_net()
    x = torch.randn(1, 4, 6, 6)
    sparsify(model, "fanin", sparsity=0.75)
    report = sparsecc.inspect(model, x)
    dense, sparse = (sum(lay.total_macs[i] for lay in report.layers) for i in (0, 1))
    assert all(lay.positions for lay in report.layers)             # per call: every layer ran on x
    assert sparse == pytest.approx(0.25 * dense, rel=0.05)
    assert sum(lay.bytes_condensed for lay in report.layers) < 0.5 * sum(lay.bytes_dense for lay in report.layers)


@pytest.mark.slow
def test_two_four_skips_layers_that_cannot_take_it_like_asp():
    """ResNet's stem has 3 input channels: `sparsify(model, "2:4")` leaves it dense and says so, every other
    layer gets 2:4, and the compiled model equals the user's sparsified model; naming such a layer explicitly
    with include= is an error."""
    model = build("resnet18")
    report = sparsify(model, "2:4", permute=False)
    assert list(report.skipped) == ["conv1.weight"] and "3 input channels" in report.skipped["conv1.weight"]
    assert "conv1.weight" in str(report) and "1 skipped" in str(report)
    assert len(report.layers) == 20 and "conv1.weight" not in {lay.fqn for lay in report.layers}
    x = torch.randn(1, 3, 32, 32)
    compiled = sparsecc.compile(model, x)
    assert "conv1.weight" not in {lay.name for lay in compiled.report.condensed}
    with torch.no_grad():
        out, expected = compiled(x), model(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    with pytest.raises(InputError, match="conv1.weight: 3 input channels"):
        sparsify(build("resnet18"), "2:4", include=lambda fqn, kind: kind == "conv2d")


def test_fanin_skips_layers_with_nothing_to_remove():
    model = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    report = sparsify(model, "fanin", sparsity=0.4)
    assert report.skipped == {"0.weight": "fan-in 1 keeps every input at 40% sparsity"}
    assert [lay.fqn for lay in report.layers] == ["2.weight"]
    with pytest.raises(InputError, match="no layer can take fanin"):
        sparsify(nn.Sequential(nn.Conv2d(1, 8, 1)), "fanin", sparsity=0.4)


def test_synthetic_two_four_masks_skip_weights_without_whole_groups():
    """A 3-channel stem (and any input width not a multiple of 4) has no 2:4 groups: the synthetic masks leave
    it dense, as `sparsify` does, instead of failing on a reshape."""
    from sparsecc.tooling import synthetic

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 6),
                          nn.Linear(6, 4))
    masks = synthetic.nm_masks(model)
    assert sorted(masks) == ["1.weight", "3.weight"]
    for fqn, mask in masks.items():
        assert mask.shape == model.get_parameter(fqn).shape
        groups = (mask.permute(0, 2, 3, 1) if mask.dim() == 4 else mask).reshape(-1, 4)
        torch.testing.assert_close(groups.sum(-1), torch.full((groups.shape[0],), 2), rtol=0, atol=0)
