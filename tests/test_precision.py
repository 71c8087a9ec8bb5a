"""``compile(..., precision="bf16")``: an fp32 model run in bfloat16 (condensed layers with bf16 values, the
rest under autocast), outputs in float32, validated against the fp32 model at the tolerance the report
states; requests that cannot be honoured are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import InputError
from sparsecc.compiler import precision
from sparsecc.core.layers import CondensedLayer
from sparsecc.tooling import synthetic


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.LayerNorm(96), nn.Linear(96, 32), nn.ReLU(),
                          nn.Linear(32, 10)).eval()
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.75, ablate=0.1))
    return model


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    synthetic.attach_with_prune(model, synthetic.structured_masks(model, "fanin", 0.75))
    return model


def _assert_within_stated_tolerance(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype == torch.float32
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=precision.TOLERANCE * scale)


@pytest.mark.parametrize("build,shape", [(_mlp, (5, 64)), (_cnn, (2, 3, 12, 12))])
@pytest.mark.parametrize("backend", ["tvm", "reference"])
def test_bf16_runs_condensed_layers_in_bf16_and_returns_float32(build, shape, backend):
    model = build()
    x = torch.randn(*shape)
    compiled = sparsecc.compile(model, (x,), precision="bf16", backend=backend)
    report = compiled.report
    assert report.validated
    assert any("precision bf16" in note and "6e-02" in note for note in report.notes), report.notes
    layers = [m for m in compiled.modules() if isinstance(m, CondensedLayer)]
    assert layers and all(m.values.dtype == torch.bfloat16 for m in layers)
    assert {lay.runtime.split("+")[0] for lay in report.condensed} == {backend}
    with torch.no_grad():
        for inputs in (x, torch.randn(*shape), torch.randn(1, *shape[1:])):
            expected = model(inputs)
            actual = compiled(inputs)
            _assert_within_stated_tolerance(actual, expected)
            # and not the fp32 result: bf16 rounding is visible, so the option did something
            assert not torch.equal(actual, sparsecc.compile(model, (inputs,), validate=False)(inputs))


def test_bf16_layers_are_checked_in_bf16():
    """Each condensed layer is validated against its dense op in bf16 (the dtype it computes in): a layer with
    wrong values fails validation even where the fp32 model's tolerance would hide it end to end."""
    model = _mlp()
    x = torch.randn(4, 64)
    compiled = sparsecc.compile(model, (x,), precision="bf16", narrow=False)
    assert sparsecc.validate(model, compiled, (x,)).ok
    layer = next(m for m in compiled.modules() if isinstance(m, CondensedLayer))
    with torch.no_grad():
        layer.values.mul_(1.05)
    result = sparsecc.validate(model, compiled, (x,))
    assert not result.ok
    assert not result.layers[layer.weight_fqn].ok, result.layers[layer.weight_fqn]


def test_default_precision_keeps_the_models_dtype():
    model = _mlp()
    compiled = sparsecc.compile(model, (torch.randn(2, 64),))
    assert all(m.values.dtype == torch.float32 for m in compiled.modules() if isinstance(m, CondensedLayer))
    assert not any("precision" in note for note in compiled.report.notes)


@pytest.mark.parametrize("kwargs,match", [
    (dict(precision="int8"), "precision='int8': choose one of"),
    (dict(precision="bf16", backend="onnxruntime"), "is for the op runtimes"),
])
def test_requests_that_cannot_be_honoured_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        sparsecc.compile(_mlp(), (torch.randn(2, 64),), **kwargs)


def test_bf16_precision_of_a_bf16_model_is_refused():
    model = _mlp().to(torch.bfloat16)
    with pytest.raises(InputError, match="runs a float32 model in torch.bfloat16"):
        sparsecc.compile(model, (torch.randn(2, 64, dtype=torch.bfloat16),), precision="bf16")
