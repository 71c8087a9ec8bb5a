"""Every call path — the eager compiled module, `torch.compile(backend="sparsecc")`, a loaded `.pt2` and the
onnxruntime engine — called the plain way (grad mode on), under `no_grad` and under `inference_mode`, on a
network with in-place ops right after condensed convolutions. An input that requires grad either gets the
same gradient as from the user's model or a clear `SparseccError`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import InputError, dynamo
from sparsecc.tooling import synthetic
from tests.conftest import assert_equivalent


class Shuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def shuffle_net() -> nn.Module:
    """A dense stem (its activations require grad in the user's model), condensed convs followed by in-place
    ReLUs and a channel shuffle, and a condensed Linear head."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 1),
                          Shuffle(), nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                          nn.ReLU(inplace=True), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()
    masks = synthetic.fanin_masks(model, 0.75)
    masks.pop("0.weight")
    synthetic.attach_with_prune(model, masks)
    return model


MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _check_modes(model, call, batches=(1, 3)):
    for mode, ctx in MODES.items():
        for batch in batches:
            x = torch.randn(batch, 8, 12, 12)
            with ctx():
                actual = call(x)
            with torch.no_grad():
                expected = model(x)
            assert_equivalent(actual.detach(), expected)


def _input_gradient(fn, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.square().sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_eager_compiled_module(backend):
    model = shuffle_net()
    compiled = sparsecc.compile(model, (torch.randn(1, 8, 12, 12),), backend=backend)
    assert compiled.report.rewrites == {"condensed_conv2d": 3, "condensed_linear": 1}
    _check_modes(model, compiled)
    with torch.enable_grad():
        assert not compiled(torch.randn(1, 8, 12, 12)).requires_grad, "a plain call built an autograd graph"


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_input_that_requires_grad_gets_the_users_gradient(backend):
    model = shuffle_net()
    compiled = sparsecc.compile(model, (torch.randn(1, 8, 12, 12),), backend=backend)
    x = torch.randn(2, 8, 12, 12)
    out, grad = _input_gradient(compiled, x)
    want_out, want_grad = _input_gradient(model, x)
    assert_equivalent(out, want_out)
    assert_equivalent(grad, want_grad)


@pytest.mark.parametrize("op", ["2:4", "fanin"])
def test_linear_ops_backward_for_the_input(op):
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    masks = synthetic.nm_masks(model) if op == "2:4" else synthetic.fanin_masks(model, 0.75, ablate=0.25)
    synthetic.attach_with_prune(model, masks)
    compiled = sparsecc.compile(model, (torch.randn(1, 32),), backend="reference")
    x = torch.randn(5, 32)
    out, grad = _input_gradient(compiled, x)
    want_out, want_grad = _input_gradient(model, x)
    assert_equivalent(out, want_out)
    assert_equivalent(grad, want_grad)


def test_loaded_pt2(tmp_path):
    model = shuffle_net()
    compiled = sparsecc.compile(model, (torch.randn(1, 8, 12, 12),), backend="tvm")
    path = sparsecc.save(compiled, tmp_path / "m.pt2")
    loaded = sparsecc.load(path)
    _check_modes(model, loaded)
    x = torch.randn(2, 8, 12, 12)
    out, grad = _input_gradient(loaded, x)
    want_out, want_grad = _input_gradient(model, x)
    assert_equivalent(out, want_out)
    assert_equivalent(grad, want_grad)


@pytest.mark.parametrize("inductor", [False, True])
def test_torch_compile_backend(inductor):
    torch._dynamo.reset()
    dynamo.REPORTS.clear()
    model = shuffle_net()
    compiled = torch.compile(model, backend=dynamo.backend_with(inductor=inductor), dynamic=False)
    _check_modes(model, compiled, batches=(2,))
    assert dynamo.last_report() is not None and dynamo.last_report().rewrites
    torch._dynamo.reset()


def test_onnxruntime_engine_refuses_inputs_that_want_grad():
    model = shuffle_net()
    compiled = sparsecc.compile(model, (torch.randn(1, 8, 12, 12),), backend="onnxruntime")
    _check_modes(model, compiled)
    with pytest.raises(InputError, match="onnxruntime engine runs outside autograd"):
        compiled(torch.randn(1, 8, 12, 12, requires_grad=True))


_FRESH = """
import sys, torch, sparsecc
model = sparsecc.load(sys.argv[1])
x = torch.load(sys.argv[2])
y = model(x)                                   # the plain way: autograd on, no inference_mode
torch.save(y.detach(), sys.argv[3])
"""


@pytest.mark.slow
def test_loaded_pt2_in_a_fresh_process_called_the_plain_way(tmp_path):
    model = shuffle_net()
    compiled = sparsecc.compile(model, (torch.randn(1, 8, 12, 12),), backend="tvm")
    path = sparsecc.save(compiled, tmp_path / "m.pt2")
    x = torch.randn(3, 8, 12, 12)
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", _FRESH, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        assert_equivalent(torch.load(tmp_path / "y.pt"), model(x))
