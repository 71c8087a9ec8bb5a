"""Max pools in their measured layout (`sparsecc.runtimes.dense`, the compiler's ``layouts`` stage): every form equals
torch's pool exactly (NaN included), the module runs the measured one and falls back to torch's pool where it
must, and a compiled model has its pools swapped, reported, and still equals the user's model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import sparsecc
from sparsecc.capture.graph import Captured
from sparsecc.compiler import pipeline
from sparsecc.runtimes.dense import MeasuredMaxPool2d
from sparsecc.runtimes import dense, tuning
from sparsecc.tooling.synthetic import fanin_mask

GEOMETRIES = [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, stride=2, ceil_mode=True),
              dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, dilation=2),
              dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Exactly torch's answer: shape, dtype, layout, every value and every NaN."""
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert got.is_contiguous() == want.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def _input(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    flat = x.view(-1)
    flat[:: 97] = float("nan")
    flat[5:: 101] = float("inf")
    flat[7:: 103] = float("-inf")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_every_form_is_torch_pool_exactly(dtype, geometry):
    pool = nn.MaxPool2d(**geometry)
    for shape in ((1, 16, 15, 13), (2, 8, 12, 12)):
        x = _input(shape, dtype)
        forms = dense.max_pool_forms(pool, x)
        assert set(forms) == {dense.PLAIN, dense.CHANNELS_LAST}
        for name, form in forms.items():
            _same(form(x), pool(x))


def test_inputs_not_in_torch_layout_get_torch_pool_only():
    """A channels-last, strided or 3-D input: the channels-last form would change the output's layout or does
    not apply, so only torch's own pool is offered."""
    pool = nn.MaxPool2d(3, 2, 1)
    x = torch.randn(1, 8, 10, 10)
    for other in (x.to(memory_format=torch.channels_last), x[..., ::2], x[0]):
        assert set(dense.max_pool_forms(pool, other)) == {dense.PLAIN}
        _same(MeasuredMaxPool2d.of(pool)(other), pool(other))


@pytest.mark.measured_choice
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_runs_the_measured_form_once_per_shape(dtype, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    dense.forget_caches()
    measured = []
    real = tuning.choose_tile

    def counting(cache, signature, tokens, tiles, cold=False, l2_cold=False):
        measured.append((signature, tuple(sorted(tiles))))
        return real(cache, signature, tokens, tiles, cold, l2_cold)

    monkeypatch.setattr(tuning, "choose_tile", counting)
    pool = nn.MaxPool2d(3, 2, 1)
    module = MeasuredMaxPool2d.of(pool)
    shapes = [(1, 16, 28, 28), (1, 16, 28, 28), (1, 16, 14, 14), (1, 16, 28, 28)]
    for i, shape in enumerate(shapes):
        x = _input(shape, dtype, seed=i)
        _same(module(x), pool(x))
    assert len(measured) == 2                       # one measurement per input shape, none per call
    assert all(tiles == (dense.CHANNELS_LAST, dense.PLAIN) for _, tiles in measured)
    chosen = module.chosen()
    assert set(chosen) == {(1, 16, 28, 28), (1, 16, 14, 14)}
    assert set(chosen.values()) <= {dense.PLAIN, dense.CHANNELS_LAST}
    # A new process (the caches forgotten) reads the choice from disk: nothing measured again.
    dense.forget_caches()
    again = MeasuredMaxPool2d.of(pool)
    x = _input(shapes[0], dtype, seed=9)
    _same(again(x), pool(x))
    assert len(measured) == 3 and dense.pool_tuning_cache().stats == {"memory": 0, "disk": 1, "measured": 0}
    dense.forget_caches()


def test_indices_gradients_and_tracing_run_torch_pool():
    pool = nn.MaxPool2d(3, 2, 1, return_indices=True)
    module = MeasuredMaxPool2d.of(pool)
    x = torch.randn(1, 4, 9, 9)
    for got, want in zip(module(x), pool(x)):
        _same(got, want)
    plain = nn.MaxPool2d(2)
    module = MeasuredMaxPool2d.of(plain)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    module(x).sum().backward()
    grad, x.grad = x.grad, None
    plain(x).sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=0, atol=0)
    program = torch.export.export(module, (torch.randn(1, 4, 8, 8),))
    assert any("max_pool2d" in str(n.target) for n in program.graph.nodes)
    y = torch.randn(1, 4, 8, 8)
    _same(program.module()(y), plain(y))


def test_module_pickles_and_copies_without_its_routes():
    module = MeasuredMaxPool2d.of(nn.MaxPool2d(3, 2, 1))
    x = torch.randn(1, 4, 9, 9)
    module(x)
    assert module.__dict__["_routes"]
    for other in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert "_routes" not in other.__dict__
        _same(other(x), module(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pools = nn.Sequential(nn.MaxPool2d(2), nn.ReLU())
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pools(self.conv2(x))
        return self.fc(x.flatten(1))


def _pruned() -> nn.Module:
    torch.manual_seed(0)
    model = _Net().eval()
    for layer in (model.conv1, model.conv2, model.fc):
        prune.custom_from_mask(layer, "weight", fanin_mask(layer.weight, 0.75))
    return model


def _pools(module: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in module.named_modules() if isinstance(m, nn.MaxPool2d)}


@pytest.mark.parametrize("route", ["graph", "swap"])
def test_compiled_model_runs_measured_pools_and_equals_the_users(route, monkeypatch):
    if route == "swap":
        monkeypatch.setattr(pipeline, "capture", lambda model, inputs=None: Captured(None, "module swapping", "forced"))
    model = _pruned()
    x = torch.randn(2, 3, 16, 16)
    compiled = sparsecc.compile(model, x)
    assert _pools(compiled.module) == {"pool": "MeasuredMaxPool2d", "pools.0": "MeasuredMaxPool2d"}
    assert _pools(model) == {"pool": "MaxPool2d", "pools.0": "MaxPool2d"}      # the user's model is untouched
    stage = next(s for s in compiled.report.stages if s.stage == "layouts")
    assert stage.summary == "2 pool(s) in their measured layout"
    assert any("2 max pool(s) run the layout measured fastest" in n and "pools.0" in n for n in compiled.report.notes)
    assert compiled.report.validated
    with torch.no_grad():
        for inputs in (x, torch.randn(1, 3, 16, 16)):
            got, want, masked = compiled(inputs), model(inputs), sparsecc.masked_reference(model)(inputs)
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)


def test_pools_stay_torch_modules_without_tuning_or_in_an_engine():
    model = _pruned()
    x = torch.randn(1, 3, 16, 16)
    untuned = sparsecc.compile(model, x, autotune=False)
    assert set(_pools(untuned.module).values()) == {"MaxPool2d"}
    engine = sparsecc.compile(model, x, backend="onnxruntime")
    for compiled in (untuned, engine):
        assert not next(s for s in compiled.report.stages if s.stage == "layouts").ran
        with torch.no_grad():
            got, want = compiled(x), model(x)
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
