"""Kernels split over torch's threads: every kernel path at 2 threads equals the dense masked op (odd row
counts, ablated rows, the token kernels' partial row pairs, transposes with edges), the split really happens,
and an error on a worker thread comes back as an exception."""

import pytest
import torch
import torch.nn.functional as F

from sparsecc.core import formats
from sparsecc.runtimes import unavailable
from sparsecc.runtimes.tvm import parallel, runtime as tvm_runtime
from sparsecc.tooling.synthetic import fanin_mask, nm_mask
from tests.conftest import assert_equivalent

pytestmark = pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}")


@pytest.fixture
def split(monkeypatch):
    """Two torch threads, a grain of one multiply-add (every call splits), and a record of launched splits."""
    launch, reason = parallel._launcher()
    assert reason is None and launch is not None
    launched = []

    def recording(kernel, n, blocks, *args):
        launched.append((n, blocks))
        return launch(kernel, n, blocks, *args)

    monkeypatch.setattr(parallel, "_launcher", lambda: (recording, None))
    monkeypatch.setattr(parallel, "GRAIN", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield launched
    torch.set_num_threads(before)


@pytest.mark.parametrize("out_f,in_f,ablate", [(9, 48, 0.3), (64, 256, 0.0), (33, 70, 0.5)])
@pytest.mark.parametrize("tokens", [1, 2, 37])
def test_linear(split, out_f, in_f, ablate, tokens):
    w = torch.randn(out_f, in_f)
    mask = fanin_mask(w, 0.8, ablate)
    enc = formats.encode_fanin(w * mask, mask, int(mask.sum(1).max()))
    bias = torch.randn(out_f)
    bound = tvm_runtime.BoundLinear(enc.values, enc.indices, enc.rows, bias, out_f)
    x = torch.randn(tokens, in_f)
    out, expected = bound.sparse(x), F.linear(x, w * mask, bias)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    assert split and all(n == 2 for n, _ in split)


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 1)])
def test_conv(split, stride, padding, kernel):
    w = torch.randn(13, 8, kernel, kernel)
    mask = fanin_mask(w.reshape(13, -1), 0.7, 0.2).reshape(w.shape)
    enc = formats.encode_fanin((w * mask).reshape(13, -1), mask.reshape(13, -1), int(mask.reshape(13, -1).sum(1).max()))
    bias = torch.randn(13)
    bound = tvm_runtime.BoundConv2d(enc.values, enc.indices, enc.rows, bias, 13, [kernel, kernel], [stride, stride],
                                    [padding, padding], [1, 1], 1, in_channels=8)
    x = torch.randn(2, 8, 11, 9)
    out, expected = bound.sparse(x), F.conv2d(x, w * mask, bias, stride, padding)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    assert split and all(n == 2 for n, _ in split)


@pytest.mark.parametrize("tokens", [1, 2, 37])
def test_2to4(split, tokens):
    w = torch.randn(21, 64)
    mask = nm_mask(w)
    values, metadata = formats.encode_nm(w * mask, mask)
    bound = tvm_runtime.BoundNM(values, metadata, None, 64)
    x = torch.randn(tokens, 64)
    out, expected = bound.sparse(x), F.linear(x, w * mask)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    assert split and all(n == 2 for n, _ in split)


@pytest.mark.parametrize("shape", [(197, 768), (768, 197), (13, 9), (5, 3)])
def test_pack_and_unpack(split, shape):
    x = torch.randn(*shape)
    xt = tvm_runtime.to_tokens_last(x, tvm_runtime.lanes())
    torch.testing.assert_close(xt[:, :shape[0]], x.t(), rtol=0, atol=0)
    out = tvm_runtime.from_tokens_last(xt.clone(), shape[0])
    assert out.shape == shape
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_split_needs_work():
    """Small calls stay on the calling thread: waking a thread would cost more than it saves."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert parallel.threads(768, 768 * 307) == 2
        assert parallel.threads(16, 16 * 8) == 1
        assert parallel.threads(1, 10 ** 9) == 1
        torch.set_num_threads(1)
        assert parallel.threads(768, 10 ** 9) == 1
    finally:
        torch.set_num_threads(before)


def test_an_error_on_a_worker_thread_is_raised():
    launch, _ = parallel._launcher()
    kernel = tvm_runtime._layout_kernel("pack", tvm_runtime.lanes())
    wrong = torch.zeros(8, 8, dtype=torch.float64)       # the kernel takes float32: it refuses on every thread
    with pytest.raises(Exception, match="float"):
        launch(kernel, 2, 1, wrong, torch.zeros(8, 8))
    with pytest.raises(Exception, match="bad arguments"):
        launch(kernel, 2, 1)
