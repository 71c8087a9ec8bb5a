"""Structural narrowing (`compile(narrow=True)`, sparsecc/planning/narrow.py): each removal pattern is exact against the
masked original, widths and parameter counts shrink as promised, and what must stay stays (with a reason)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import InputError
from sparsecc.capture.masks import prepare
from sparsecc.planning.narrow import narrow
from sparsecc.tooling import synthetic
from sparsecc.tooling.demo import build, sparse_model
from tests.conftest import assert_equivalent


def _ablate_rows(layer: nn.Module, rows: list[int], density: float = 0.5) -> torch.Tensor:
    mask = synthetic.fanin_mask(layer.weight, 1.0 - density)
    mask[rows] = False
    return mask


def _narrowed(model: nn.Module, masks: dict, x: torch.Tensor):
    result = narrow(prepare(model, masks), (x,))
    with torch.no_grad():
        assert_equivalent(result.model(x), sparsecc.masked_reference(model, masks)(x))
    return result


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tensor_elements(model: nn.Module) -> int:
    """Parameters and buffers: condensed layers hold their tensors as buffers, and BatchNorms folded into them
    leave no parameters behind."""
    return _params(model) + sum(b.numel() for b in model.buffers())


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    for t in (bn.weight, bn.bias, bn.running_mean):
        nn.init.normal_(t)
    nn.init.uniform_(bn.running_var, 0.5, 2.0)
    return bn


def test_linear_act_linear_folds_constants_into_the_consumer_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Dropout(0.1), nn.Linear(10, 6), nn.Tanh(),
                          nn.Linear(6, 3)).eval()
    masks = {"0.weight": _ablate_rows(model[0], [1, 4, 7]), "3.weight": _ablate_rows(model[3], [0])}
    result = _narrowed(model, masks, torch.randn(5, 12))
    assert [str(r) for r in result.removals] == [
        "0 -> 3: 10 -> 7 channels (3 constant folded into 3.bias, 0 unused)",
        "3 -> 5: 6 -> 5 channels (1 constant folded into 5.bias, 0 unused)"]
    assert (result.model[0].out_features, result.model[3].in_features, result.model[3].out_features,
            result.model[5].in_features) == (7, 7, 5, 5)
    # 3 rows of 12 + bias, 3 columns of 6, 1 row of 7 + bias, 1 column of 3
    assert _params(model) - _params(result.model) == 3 * 13 + 3 * 6 + 1 * 8 + 1 * 3
    assert result.skipped["5"] == "it is the model's output"


def test_consumer_without_bias_gets_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8, bias=False)).eval()
    masks = {"0.weight": _ablate_rows(model[0], [3, 9]), "2.weight": synthetic.fanin_mask(model[2].weight, 0.25)}
    x = torch.randn(4, 12)
    compiled = sparsecc.compile(model, x, masks=masks, narrow=True)    # validated against the masked original
    assert compiled.report.notes[0] == "narrowed 0 -> 2: 16 -> 14 channels (2 constant folded into 2.bias, 0 unused)"
    assert [lay.action for lay in compiled.report.layers] == ["condensed_linear"] * 2
    with torch.no_grad():
        assert_equivalent(compiled(x), sparsecc.masked_reference(model, masks)(x))


def test_conv_batchnorm_relu_conv_without_padding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _bn(8), nn.ReLU(), nn.Conv2d(8, 4, 1), _bn(4)).eval()
    masks = {"0.weight": _ablate_rows(model[0], [0, 5])}
    result = _narrowed(model, masks, torch.randn(2, 3, 7, 7))
    assert [(r.before, r.after, r.folded) for r in result.removals] == [(8, 6, 2)]
    assert result.model[1].num_features == 6 and result.model[1].running_mean.shape == (6,)


def test_zero_padding_consumer_takes_only_channels_whose_constant_is_zero():
    torch.manual_seed(0)
    bn = _bn(8)
    with torch.no_grad():   # after BN + ReLU, channel 2's constant is 0 and channel 6's is positive
        bn.bias[2], bn.bias[6] = -5.0, 5.0
        bn.running_mean.zero_()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), bn, nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    masks = {"0.weight": _ablate_rows(model[0], [2, 6])}
    result = _narrowed(model, masks, torch.randn(1, 3, 8, 8))
    assert [(r.before, r.after, r.folded) for r in result.removals] == [(8, 7, 1)]
    kept = result.layers["0.weight"].mask.reshape(7, -1).any(1)
    assert int((~kept).sum()) == 1        # channel 6 stays, ablated: it is not constant at the padded border

    only_positive = {"0.weight": _ablate_rows(model[0], [6])}
    result = _narrowed(model, only_positive, torch.randn(1, 3, 8, 8))
    assert result.removals == [] and "zero-pads" in result.skipped["0"]


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, ceil_mode=True)], ids=str)
def test_max_pool_between_producer_and_consumer(pool):
    """VGG's conv -> ReLU -> 2x2 max pool -> conv: an ablated filter's constant goes through the pool (a max of a
    constant plane, padded with -inf, is that constant) into the next convolution's bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(8, 6, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 4)).eval()
    with torch.no_grad():
        model[0].bias[[1, 5]] = torch.tensor([0.7, -0.3])       # one positive constant, one zeroed by the ReLU
    masks = {"0.weight": _ablate_rows(model[0], [1, 5]), "3.weight": _ablate_rows(model[3], [2])}
    x = torch.randn(2, 3, 14, 14)
    result = _narrowed(model, masks, x)
    assert [(r.before, r.after, r.folded) for r in result.removals] == [(8, 6, 2), (6, 5, 1)]
    compiled = sparsecc.compile(model, x, masks=masks)
    with torch.no_grad():
        got, want = compiled(x), sparsecc.masked_reference(model, masks)(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_equivalent(got, want)


def test_conv_pool_flatten_linear_scales_indices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), _bn(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(6 * 4, 5)).eval()
    masks = {"0.weight": _ablate_rows(model[0], [1, 3])}
    result = _narrowed(model, masks, torch.randn(2, 3, 6, 6))
    assert [(r.consumer, r.before, r.after) for r in result.removals] == [("5", 6, 4)]
    assert result.model[5].in_features == 4 * 4


def test_residual_branch_is_not_crossed():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h + x)        # h's channels meet x's: removing one would change the sum

    model = Block().eval()
    masks = {"a.weight": _ablate_rows(model.a, [0, 3])}
    result = _narrowed(model, masks, torch.randn(3, 8))
    assert result.removals == [] and "add" in result.skipped["a"]


class _Fanout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b, self.c = nn.Linear(8, 4), nn.Linear(8, 4)
        self.d = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        q = self.b(h)
        return self.d(torch.tanh(self.c(h)) + q)        # q and tanh(c) meet in an add


def test_one_output_feeding_several_consumers_folds_into_each():
    model = _Fanout().eval()
    masks = {"a.weight": _ablate_rows(model.a, [2, 5]), "c.weight": _ablate_rows(model.c, [1])}
    result = _narrowed(model, masks, torch.randn(3, 8))
    assert [str(r) for r in result.removals] == [
        "a -> b, c: 8 -> 6 channels (2 constant folded into b.bias, c.bias, 0 unused)"]
    assert (result.model.b.in_features, result.model.c.in_features) == (6, 6)
    assert result.skipped["c"].startswith("add")                   # c's output meets b's in an add


def test_unused_input_channels_are_removed_from_a_dense_producer():
    # SWAT channel-structured consumer: whole input channels are zero; the producer only feeds it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    mask = torch.ones_like(model[2].weight, dtype=torch.bool)
    mask[:, [1, 2, 5]] = False
    result = _narrowed(model, {"2.weight": mask}, torch.randn(1, 3, 6, 6))
    assert [(r.before, r.after, r.folded, r.unused) for r in result.removals] == [(8, 5, 0, 3)]
    assert str(sparsecc.compile(model, torch.randn(1, 3, 6, 6), masks={"2.weight": mask}, narrow=True)
               .report.layers[1].structure) == "dense"          # what is left of the consumer is dense


def test_constant_fan_in_consumer_stays_constant_fan_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    masks = synthetic.fanin_masks(model, 0.75, 0.3)
    x = torch.randn(4, 64)
    compiled = sparsecc.compile(model, x, masks=masks, narrow=True)
    consumer = compiled.report.layers[1]
    assert consumer.shape[1] < 64 and str(consumer.structure).startswith("fan-in k=")
    assert consumer.action == "condensed_linear"
    with torch.no_grad():
        assert_equivalent(compiled(x), sparsecc.masked_reference(model, masks)(x))


def test_two_four_consumer_is_left_with_a_reason():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    masks = {"0.weight": _ablate_rows(model[0], [0]), "2.weight": synthetic.nm_mask(model[2].weight)}
    result = _narrowed(model, masks, torch.randn(2, 8))
    assert result.removals == [] and "2:4" in result.skipped["0"]


def test_narrow_needs_example_inputs():
    with pytest.raises(InputError, match="narrow=True"):
        sparsecc.compile(nn.Sequential(nn.Linear(4, 4)), narrow=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_with_ablated_neurons(name):
    model = sparse_model(name, 0.9, 0.3)
    x = torch.randn(1, 3, 32, 32)
    plain = sparsecc.compile(model, x, narrow=False)
    compiled = sparsecc.compile(model, x)          # narrowed by default; validated against the masked original
    removed = [n for n in compiled.report.notes if n.startswith("narrowed ")]
    pairs = {"resnet18": 8, "resnet50": 32}[name]               # conv1 -> conv2 per block (+ conv2 -> conv3)
    assert len(removed) == pairs
    assert _tensor_elements(compiled.module) < _tensor_elements(plain.module)
    assert any("used by 2 ops" in n or "add" in n for n in compiled.report.notes)   # residual outputs stay
    with torch.no_grad():
        assert_equivalent(compiled(x), sparsecc.masked_reference(model)(x))


@pytest.mark.slow
def test_vit_b_16_mlp_neurons_are_removed():
    model = build("vit_b_16", image_size=64)
    masks = synthetic.fanin_masks(model, 0.9, 0.3, synthetic.vit_encoder)
    x = torch.randn(1, 3, 64, 64)
    compiled = sparsecc.compile(model, x, masks=masks, narrow=True)
    removed = [n for n in compiled.report.notes if n.startswith("narrowed ")]
    assert len(removed) == 12 and all(".mlp.0 -> " in n and "3072 -> 2150 channels" in n for n in removed)
    with torch.no_grad():
        assert_equivalent(compiled(x), sparsecc.masked_reference(model, masks)(x))


def test_narrowing_copies_modules_not_weights_and_writes_into_nothing_shared():
    """The narrowed copy shares every tensor it does not change with the masked reference (one copy of the
    weights where one is enough), and the reference is left as it was: the consumer's bias that absorbs the
    ablated rows' constants is a new tensor."""
    from sparsecc.capture.masks import structural_copy
    from sparsecc.core.inputs import Call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].bias.uniform_(0.5, 1.0)      # ablated rows output relu(bias) > 0: a constant the consumer absorbs
    synthetic.attach_with_prune(model, {"0.weight": synthetic.fanin_mask(model[0].weight, 0.5, ablate=0.25)})
    prepared = prepare(model)
    before = {n: t.clone() for n, t in prepared.reference.state_dict().items()}
    copied = structural_copy(prepared.reference)
    assert copied is not prepared.reference and copied[0] is not prepared.reference[0]
    assert copied[4].weight is prepared.reference[4].weight

    x = torch.randn(3, 16)
    result = narrow(prepared, Call((x,)))
    assert result.model[0].weight.shape[0] == 24, "the 8 ablated rows are removed"
    assert result.model[4].weight is prepared.reference[4].weight, "an untouched layer's weight is shared"
    assert result.model[2].bias is not prepared.reference[2].bias
    with torch.no_grad():
        y, expected = result.model(x), model(x)       # the user's model as run: its prune hook live
    assert y.shape == expected.shape and y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, prepared.reference(x), rtol=1e-5, atol=1e-5)
    after = prepared.reference.state_dict()
    for name, t in before.items():
        torch.testing.assert_close(after[name], t, rtol=0, atol=0)
