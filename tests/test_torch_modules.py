"""PyTorch's own modules that read their layers' weights (`nn.TransformerEncoder` and its layer check
``linear1.weight`` etc. to choose a fused fast path): they compile with their layers condensed, the fused
path never runs the dense weights, and outputs equal the user's model as the user runs it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc.capture.graph import Captured
from sparsecc.compiler import pipeline
from sparsecc.core.layers import CondensedLayer
from sparsecc.tooling import synthetic
from tests.conftest import assert_equivalent


def encoder(batch_first=True, norm_first=False, activation="relu", layers=2, final_norm=False):
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=batch_first, norm_first=norm_first,
                                       activation=activation)
    model = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(64) if final_norm else None,
                                  enable_nested_tensor=batch_first).eval()
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.75, ablate=0.1))
    return model


def _count_condensed_calls(compiled) -> list[str]:
    """Every condensed layer's runs, by name: forward hooks fire for a layer called alone and for a layer run in
    a chain (`sparsecc.core.chain` calls them with what the chained call computed)."""
    calls: list[str] = []
    for mod in compiled.modules():
        if isinstance(mod, CondensedLayer):
            mod.register_forward_hook(lambda m, args, out: calls.append(m.name))
    return calls


def _check(model, compiled, *inputs):
    with torch.no_grad():
        expected = model(*inputs)
        actual = compiled(*inputs)
    assert_equivalent(actual, expected)


@pytest.mark.parametrize("batch_first,norm_first,activation,final_norm", [
    (True, False, "relu", False), (False, False, "gelu", True), (True, True, "gelu", True)])
@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_transformer_encoder_traces_with_every_linear_condensed(backend, batch_first, norm_first, activation,
                                                                final_norm):
    model = encoder(batch_first, norm_first, activation, final_norm=final_norm)
    shape = (2, 10, 64) if batch_first else (10, 2, 64)
    compiled = sparsecc.compile(model, (torch.randn(*shape),), backend=backend)
    assert compiled.report.capture == "torch.fx"
    assert compiled.report.rewrites == {"condensed_linear": 8}, compiled.report.rewrites
    calls = _count_condensed_calls(compiled)
    _check(model, compiled, torch.randn(*shape))
    assert len(calls) == 8


def test_transformer_encoder_layer_alone():
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    synthetic.attach_with_prune(layer, synthetic.fanin_masks(layer, 0.75))
    compiled = sparsecc.compile(layer, (torch.randn(1, 5, 64),))
    assert compiled.report.rewrites == {"condensed_linear": 4}
    _check(layer, compiled, torch.randn(3, 5, 64))


def test_padding_mask_matches_the_nested_tensor_path():
    """Eval no-grad calls with a key padding mask run on nested tensors in torch and return zeros at padded
    positions; the compiled encoder gives the same."""
    model = encoder(batch_first=True, final_norm=True)
    x = torch.randn(3, 10, 64)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[0, 6:] = True
    padding[2, 3:] = True
    compiled = sparsecc.compile(model, (x, None, padding))
    assert compiled.report.rewrites == {"condensed_linear": 8}
    with torch.no_grad():
        expected = model(x, None, padding)
        actual = compiled(x, None, padding)
        assert bool((expected[0, 6:] == model.norm.bias).all()), "torch's nested path no longer zeroes padding"
    assert_equivalent(actual, expected)


def test_causal_mask():
    model = encoder(batch_first=True)
    x = torch.randn(2, 7, 64)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    compiled = sparsecc.compile(model, (x, causal))
    _check(model, compiled, torch.randn(2, 7, 64), causal)


@pytest.mark.parametrize("batch_first", [True, False])
def test_module_swapping_never_runs_the_fused_path_on_dense_weights(monkeypatch, batch_first):
    """Without a graph, the encoder's own forward runs and reads ``linear1.weight``: it gets the dense view,
    which sends it down the regular path through the condensed layers."""
    monkeypatch.setattr(pipeline, "capture", lambda model, n_args=None: Captured(None, "module swapping", "forced"))
    model = encoder(batch_first)
    shape = (2, 10, 64) if batch_first else (10, 2, 64)
    compiled = sparsecc.compile(model, (torch.randn(*shape),))
    assert compiled.report.rewrites == {"condensed_linear": 4}   # linear1/2; attention needs a graph
    calls = _count_condensed_calls(compiled)
    _check(model, compiled, torch.randn(*shape))
    assert sorted(calls) == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"]


class ReadsWeights(nn.Module):
    """A library module that inspects its child's weight and attributes and also uses the weight itself."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 16)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x, img):
        assert self.fc.weight.dtype == x.dtype and self.fc.in_features == x.shape[-1]
        assert self.conv.weight.shape == (8, 4, 3, 3) and self.conv.in_channels == img.shape[1]
        y = self.fc(x) + 0.5 * F.linear(x, self.fc.weight, self.fc.bias)
        return y, self.conv(img)


def test_condensed_layers_expose_weight_and_shape_attributes(monkeypatch):
    monkeypatch.setattr(pipeline, "capture", lambda model, n_args=None: Captured(None, "module swapping", "forced"))
    model = ReadsWeights().eval()
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.75, ablate=0.25))
    x, img = torch.randn(3, 32), torch.randn(2, 4, 6, 6)
    compiled = sparsecc.compile(model, (x, img))
    assert compiled.report.rewrites == {"condensed_linear": 1, "condensed_conv2d": 1}
    with torch.no_grad():
        (y, z), (ey, ez) = compiled(x, img), model(x, img)
    assert_equivalent(y, ey)
    assert_equivalent(z, ez)
    fc = compiled.module.fc
    assert_equivalent(fc.weight.as_subclass(torch.Tensor), sparsecc.masked_reference(model).fc.weight.detach())


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
def test_transformer_with_decoder(batch_first, norm_first):
    """nn.Transformer: every Linear condensed except the cross-attention input projections, which the
    decoder applies as row slices of one weight (kept, and the report says so)."""
    model = nn.Transformer(32, 4, 2, 2, 64, batch_first=batch_first, norm_first=norm_first).eval()
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.75))
    src, tgt = (torch.randn(2, 7, 32), torch.randn(2, 5, 32))
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    compiled = sparsecc.compile(model, (src, tgt, None, causal))
    assert compiled.report.capture == "torch.fx"
    assert compiled.report.rewrites == {"condensed_linear": 18}
    kept = {lay.name for lay in compiled.report.layers if lay.action == "kept"}
    assert kept == {f"decoder.layers.{i}.multihead_attn.in_proj_weight" for i in range(2)}
    _check(model, compiled, src, tgt, None, causal)
