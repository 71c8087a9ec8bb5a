"""Residual adds written into the condensed layer's output before them (`sparsecc.passes.inplace`,
`sparsecc.core.inplace`): which adds the pass rewrites, that the compiled model equals the user's model on every
runtime, and that `add_into` writes in place only where no one can see it (a view, a tensor someone else holds, a
broadcast or a type promotion, autograd, a tracer: out of place)."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

import sparsecc
from sparsecc.core.inplace import add_into
from sparsecc.core.layers import CondensedLayer
from sparsecc.tooling import synthetic
from tests.conftest import assert_equivalent


class Bottleneck(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN, plus the input (ResNet's residual), then ReLU."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class Encoder(nn.Module):
    """A pre-norm transformer MLP: the add reads fc2's output through an eval Dropout, and a second add reads
    a layer whose output the block also returns (not rewritten)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2, self.drop = nn.Linear(width, 64), nn.Linear(64, width), nn.Dropout(0.1)
        self.side = nn.Linear(width, width)

    def forward(self, x):
        h = x + self.drop(self.fc2(torch.relu(self.fc1(self.norm(x)))))
        s = self.side(h)
        return s + h, s


def _sparse(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.75))
    return model


def _adds(compiled) -> list[fx.Node]:
    return [n for n in compiled.module.graph.nodes if n.op == "call_function" and n.target is add_into]


@pytest.mark.parametrize("backend", ["tvm", "reference"])
def test_residual_adds_write_into_the_layer_output_and_equal_the_users_model(backend):
    model = _sparse(Bottleneck())
    x = torch.randn(2, 16, 9, 9)
    compiled = sparsecc.compile(model, (x,), backend=backend)
    assert [n.args[0].target for n in _adds(compiled)] == ["conv2"]
    assert any("1 residual add(s)" in note and "after conv2" in note for note in compiled.report.notes)
    with torch.no_grad():
        for batch in (x, x[:1], torch.randn(3, 16, 9, 9)):
            got, want = compiled(batch), model(batch)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert_equivalent(got, want)


def test_an_add_reads_through_eval_dropout_and_a_shared_output_is_left_alone():
    model = _sparse(Encoder())
    x = torch.randn(2, 7, 32)
    compiled = sparsecc.compile(model, (x,))
    assert [n.args[0].target for n in _adds(compiled)] == ["drop"]      # fc2 -> drop -> add; not s + h
    assert sum(1 for n in compiled.module.graph.nodes if n.target is operator.add) == 1
    with torch.no_grad():
        for batch in (x, torch.randn(1, 7, 32)):
            (got, side), (want, want_side) = compiled(batch), model(batch)
            for a, e in ((got, want), (side, want_side)):
                assert a.shape == e.shape and a.dtype == e.dtype
                assert_equivalent(a, e)


def test_a_hook_that_keeps_the_layer_output_keeps_it_as_it_was():
    model = _sparse(Bottleneck())
    x = torch.randn(1, 16, 9, 9)
    compiled = sparsecc.compile(model, (x,))
    layer = compiled.module.get_submodule("conv2")
    assert isinstance(layer, CondensedLayer) and _adds(compiled)
    kept = []
    handle = layer.register_forward_hook(lambda m, args, out: kept.append((out, out.clone())))
    try:
        with torch.no_grad():
            got = compiled(x)
    finally:
        handle.remove()
    (out, copy), = kept
    assert torch.equal(out, copy), "the add wrote into an output a hook holds"
    assert_equivalent(got, model(x))


def test_add_into_writes_in_place_only_where_unobservable():
    other = torch.randn(3, 4)
    fresh = torch.randn(3, 4)
    want = fresh + other
    assert add_into(fresh, other) is fresh                   # a tensor only the caller's variable holds
    assert torch.equal(fresh, want)

    base = torch.randn(6, 4)
    before = base.clone()
    assert not torch.equal(add_into(base[:3], other), before[:3]) and torch.equal(base, before)    # a view

    held = torch.randn(3, 4)
    keep = [held]
    before = held.clone()
    result = add_into(held, other)
    assert result is not held and torch.equal(keep[0], before)

    row = torch.randn(1, 4)                                  # broadcast into a larger sum
    assert add_into(row, other).shape == (3, 4)
    half = torch.randn(3, 4, dtype=torch.bfloat16)           # promoted to float32
    result = add_into(half, other)
    assert result.dtype == torch.float32 and half.dtype == torch.bfloat16

    leaf = torch.randn(3, 4, requires_grad=True)
    out = add_into(leaf * 2, other)
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.full((3, 4), 2.0), rtol=0.0, atol=0.0)


def test_a_saved_and_loaded_model_adds_out_of_place_in_its_program(tmp_path):
    model = _sparse(Bottleneck())
    x = torch.randn(2, 16, 9, 9)
    compiled = sparsecc.compile(model, (x,))
    assert _adds(compiled)
    sparsecc.save(compiled, tmp_path / "m.pt2")
    loaded = sparsecc.load(tmp_path / "m.pt2")
    with torch.no_grad():
        got, want = loaded(x), model(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_equivalent(got, want)
