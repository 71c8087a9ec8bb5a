"""Calls that must behave as the user's (masked dense) model does: NaN/Inf inputs, a batch of 0, inputs of
another dtype or device, and the compiled model pickled, deep-copied, moved and round-tripped through its
state_dict."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import InputError
from sparsecc.compiler import compiled as compiled_module
from sparsecc.tooling import synthetic
from tests.conftest import assert_equivalent

BACKENDS = ["reference", "tvm"]


def net() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    masks = synthetic.fanin_masks(model, 0.75, ablate=0.25)
    masks["6.weight"] = synthetic.nm_mask(model[6].weight)
    synthetic.attach_with_prune(model, masks)
    return model


def _x(batch=2):
    return torch.randn(batch, 4, 6, 6)


def _same_non_finite(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "NaN at other positions than the dense model"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), "Inf at other positions than the dense model"
    finite = torch.isfinite(expected)
    if finite.any():
        assert_equivalent(actual[finite], expected[finite])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_propagates_as_in_the_dense_model(backend, value):
    """One bad input position: in the masked dense model it reaches every output row (0 * NaN is NaN, and
    ablated rows too); a condensed kernel would only reach the rows that keep that position."""
    model = nn.Sequential(nn.Linear(32, 24)).eval()
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.9, ablate=0.25))
    compiled = sparsecc.compile(model, (torch.randn(1, 32),), backend=backend)
    x = torch.randn(3, 32)
    x[1, 5] = value
    with torch.no_grad():
        _same_non_finite(compiled(x), model(x))
        assert_equivalent(compiled(x[:1]), model(x[:1]))    # a finite call after it is condensed as before


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_input_through_a_cnn(backend):
    model = net()
    compiled = sparsecc.compile(model, (_x(),), backend=backend)
    x = _x(3)
    x[0, 1, 2, 3] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    with torch.no_grad():
        _same_non_finite(compiled(x), model(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_zero(backend):
    model = net()
    compiled = sparsecc.compile(model, (_x(),), backend=backend)
    with torch.no_grad():
        actual, expected = compiled(_x(0)), model(_x(0))
    assert actual.shape == expected.shape == (0, 16) and actual.dtype == expected.dtype
    assert_equivalent(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_of_another_dtype_is_refused_like_the_dense_model(dtype):
    model = net()
    compiled = sparsecc.compile(model, (_x(),))
    with pytest.raises(RuntimeError):      # the user's model does not convert either
        model(_x().to(dtype))
    with pytest.raises(InputError, match=f"input 0: got {dtype}.*compiled for torch.float32"):
        compiled(_x().to(dtype))


def test_float64_model_compiles_and_runs_in_float64():
    model = net().double()
    x = _x().double()
    compiled = sparsecc.compile(model, (x,))
    with torch.no_grad():
        y = _x(3).double()
        assert_equivalent(compiled(y), model(y))


def test_input_on_another_device_is_a_clear_error():
    compiled = sparsecc.compile(net(), (_x(),))
    device = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(InputError, match=f"input 0 is on {device}.*tensors are on cpu"):
        compiled(_x().to(device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["pickle", "deepcopy", "to_cpu", "state_dict"])
def test_copies_moves_and_state_dict_round_trip(backend, how, tmp_path):
    model = net()
    compiled = sparsecc.compile(model, (_x(),), backend=backend)
    x = _x(3)
    with torch.no_grad():
        compiled(x)           # bound kernels exist before the copy
    if how == "pickle":
        other = pickle.loads(pickle.dumps(compiled))
    elif how == "deepcopy":
        other = copy.deepcopy(compiled)
    elif how == "to_cpu":
        other = compiled.to("cpu")
    else:
        torch.save(compiled.state_dict(), tmp_path / "sd.pt")
        other = sparsecc.compile(model, (_x(),), backend=backend)
        with torch.no_grad():
            for t in other.state_dict().values():
                if t.is_floating_point():
                    t.zero_()         # prove the values come back from the file
        other.load_state_dict(torch.load(tmp_path / "sd.pt"))
    with torch.no_grad():
        assert_equivalent(other(x), model(x))
        assert_equivalent(compiled(x), model(x))


def test_finite_calls_run_condensed_also_when_the_first_call_fixes_the_inputs(monkeypatch):
    """Without example inputs the first call is validated and fixes the input spec; it and later finite
    calls run the condensed kernels, not the dense semantics kept for non-finite inputs."""
    model = net()
    compiled = sparsecc.compile(model)

    def refuse():
        raise AssertionError("dense semantics on a finite call")

    monkeypatch.setattr(compiled_module, "dense_semantics", refuse)
    x = _x(2)
    with torch.no_grad():
        assert_equivalent(compiled(x), model(x))
        y = _x(1)
        assert_equivalent(compiled(y), model(y))


def test_validation_holds_all_subnormal_fp16_outputs_to_their_spacing():
    """An fp16 layer whose outputs are all subnormal (a depthwise convolution of a randomly initialised
    MobileNetV3) differs from torch's by one spacing (6e-8) when summed in another order: within tolerance;
    a difference of many spacings, or any normal-range output off by more than its tolerance, is not."""
    from sparsecc.compiler.validation import compare

    spacing = torch.finfo(torch.float16).tiny * torch.finfo(torch.float16).eps
    expected = torch.tensor([2.0, -1.0, 0.0, 1.0], dtype=torch.float16) * spacing
    one_rounding = compare("out", expected + torch.tensor([spacing, 0, 0, -spacing], dtype=torch.float16), expected)
    assert one_rounding.ok and one_rounding.max_abs == float(spacing)
    assert not compare("out", expected + torch.tensor([64 * spacing, 0, 0, 0], dtype=torch.float16), expected).ok
    normal = torch.tensor([1.0, -0.5], dtype=torch.float16)
    assert not compare("out", normal + torch.tensor([0.02, 0.0], dtype=torch.float16), normal).ok
    assert compare("out", normal + torch.tensor([0.005, 0.0], dtype=torch.float16), normal).ok


def test_validation_matches_non_finite_reference_outputs_exactly():
    """NaN / Inf where the user's model gives them must be where the compiled model gives them; the finite rest
    is compared as usual, and a mismatch says the reference itself is not finite."""
    from sparsecc.compiler.validation import NON_FINITE, compare

    expected = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    same = compare("out", torch.tensor([1.0, float("nan"), float("inf"), -2.0 + 1e-7]), expected)
    assert same.ok and same.max_abs < 1e-6
    for wrong in ([1.0, 0.0, float("inf"), -2.0], [1.0, float("nan"), float("-inf"), -2.0],
                  [1.5, float("nan"), float("inf"), -2.0]):
        stat = compare("out", torch.tensor(wrong), expected)
        assert not stat.ok
    assert compare("out", torch.tensor([1.0, 0.0, float("inf"), -2.0]), expected).detail == NON_FINITE
    assert compare("out", torch.full((2,), float("nan")), torch.full((2,), float("nan"))).ok
