"""TVM runtime kernels against the dense masked torch ops: shapes, k, ablation, bias, token counts on both
kernel paths and their tails, index widths, misaligned and non-contiguous inputs, threads, and the kernel
cache (hit, corrupt entry, concurrent compiles)."""

import copy
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc import InputError
from sparsecc.core import formats
from sparsecc.runtimes import get_runtime, unavailable
from sparsecc.runtimes.tvm import runtime as tvm_runtime
from sparsecc.tooling.synthetic import fanin_mask
from tests.conftest import assert_equivalent

pytestmark = pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}")


def _layer(out_f, in_f, sparsity, ablate, index_dtype=torch.int16):
    w = torch.randn(out_f, in_f)
    mask = fanin_mask(w, sparsity, ablate)
    enc = formats.encode_fanin(w * mask, mask, int(mask.sum(1).max()))
    return w * mask, formats.FanIn(enc.values, enc.indices.to(index_dtype), enc.rows)


@pytest.mark.parametrize("out_f,in_f,sparsity,ablate", [
    (64, 128, 0.9, 0.1),      # k = 13: not a multiple of the vector width
    (40, 100, 0.5, 0.0),      # in_features not a multiple of 16, no ablation
    (9, 24, 0.95, 0.3),       # k = 1; 9 rows: not a multiple of the 4-row block
    (33, 70, 0.8, 0.5),       # half the rows ablated
    (47, 300, 0.7, 0.1),      # k = 90: two K chunks of the token kernel plus a tail
])
@pytest.mark.parametrize("tokens", [(1,), (2,), (8,), (2, 13), (37,)])
@pytest.mark.parametrize("bias", [True, False])
def test_condensed_linear(out_f, in_f, sparsity, ablate, tokens, bias):
    w, enc = _layer(out_f, in_f, sparsity, ablate)
    b = torch.randn(out_f) if bias else None
    x = torch.randn(*tokens, in_f)
    y = tvm_runtime.KERNELS["condensed_linear"](x, enc.values, enc.indices, enc.rows, b, out_f)
    assert_equivalent(y, F.linear(x, w, b))


@pytest.mark.parametrize("tokens", [1, 20])
def test_int32_indices(tokens):
    w, enc = _layer(24, 50, 0.7, 0.2, torch.int32)
    x = torch.randn(tokens, 50)
    y = tvm_runtime.KERNELS["condensed_linear"](x, enc.values, enc.indices, enc.rows, None, 24)
    assert_equivalent(y, F.linear(x, w))


def test_every_row_ablated_outputs_bias():
    b = torch.randn(5)
    x = torch.randn(2, 7)
    y = tvm_runtime.KERNELS["condensed_linear"](x, torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.int16),
                                     torch.zeros(0, dtype=torch.int64), b, 5)
    assert_equivalent(y, b.expand(2, 5).contiguous())


@pytest.mark.parametrize("op", ["condensed_linear", "condensed_conv2d"])
def test_every_row_ablated_output_does_not_alias_the_bias(op):
    # ViT-B/16's head is zero-initialised: at batch 1 its broadcast bias was a view of the bias buffer, which
    # the custom op refused (outputs may not alias inputs) and callers could write through.
    b = torch.randn(5)
    empty = (torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.int16), torch.zeros(0, dtype=torch.int64), b, 5)
    if op == "condensed_linear":
        x, expected = torch.randn(1, 7), b.expand(1, 5)
        y = torch.ops.sparsecc.condensed_linear(x, *empty, "tvm")
    else:
        x, expected = torch.randn(1, 3, 1, 1), b.view(1, 5, 1, 1)
        y = torch.ops.sparsecc.condensed_conv2d(x, *empty, [1, 1], [1, 1], [0, 0], [1, 1], 1, "tvm")
    assert_equivalent(y, expected.contiguous())
    y.add_(1.0)
    assert_equivalent(b, expected.reshape(5))


def test_op_calls_reuse_one_binding_until_a_constant_changes():
    w, enc = _layer(24, 40, 0.75, 0.25)
    b = torch.randn(24)
    run = lambda x: tvm_runtime.KERNELS["condensed_linear"](x, enc.values, enc.indices, enc.rows, b, 24)  # noqa: E731
    x = torch.randn(1, 40)
    assert_equivalent(run(x), F.linear(x, w, b))
    first = enc.values.__dict__["_sparsecc_bound"].fn
    assert_equivalent(run(x), F.linear(x, w, b))
    assert enc.values.__dict__["_sparsecc_bound"].fn is first          # same constants: bound once
    with torch.no_grad():
        enc.values.mul_(2)
        b.add_(1)
    w2 = formats.decode_fanin(enc.values, enc.indices, enc.rows, 24, 40)
    assert_equivalent(run(x), F.linear(x, w2, b))                        # in-place edits are seen
    assert enc.values.__dict__["_sparsecc_bound"].fn is not first


def test_tensors_carrying_a_binding_deep_copy_and_save(tmp_path):
    """Op calls leave a binding (compiled kernels) on the values tensor: copies and saved state dicts drop it and
    bind again on their first call, instead of failing to serialise the kernels."""
    w, enc = _layer(16, 32, 0.75, 0.25)
    x = torch.randn(1, 32)
    tvm_runtime.KERNELS["condensed_linear"](x, enc.values, enc.indices, enc.rows, None, 16)
    copied = copy.deepcopy(enc.values)
    torch.save({"values": enc.values}, tmp_path / "v.pt")
    loaded = torch.load(tmp_path / "v.pt")["values"]
    for values in (copied, loaded):
        torch.testing.assert_close(values, enc.values, rtol=0, atol=0)
        y = tvm_runtime.KERNELS["condensed_linear"](x, values, enc.indices, enc.rows, None, 16)
        assert_equivalent(y, F.linear(x, w))


@pytest.mark.parametrize("tokens", [1, 12])
def test_misaligned_and_non_contiguous_inputs(tokens):
    w, enc = _layer(32, 64, 0.9, 0.1)
    b = torch.randn(32)
    storage = torch.randn(tokens * 64 + 1)
    misaligned = storage[1:].view(tokens, 64)                # 4 bytes past a 64-byte boundary
    assert misaligned.data_ptr() % 64 != 0
    transposed = torch.randn(64, tokens).t()                 # non-contiguous
    values = torch.randn(enc.values.numel() + 1)[1:].view_as(enc.values).copy_(enc.values)
    for x in (misaligned, transposed):
        for v in (enc.values, values):
            y = tvm_runtime.KERNELS["condensed_linear"](x, v, enc.indices, enc.rows, b, 32)
            assert_equivalent(y, F.linear(x, w, b))


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (9, 7), (8, 8), (16, 3), (197, 768), (3072, 197), (13, 200)])
def test_pack_and_unpack_are_exact_copies(shape):
    """The token path's layout changes: ``[tokens, in]`` to ``[in, tokens_padded]`` (padding zero) and back, full
    blocks, ragged edges on both sides, a misaligned source, at the host's vector width."""
    x = torch.randn(*shape)
    misaligned = torch.randn(x.numel() + 1)[1:].view(shape).copy_(x)
    width = tvm_runtime.lanes()
    for src in (x, misaligned):
        xt = tvm_runtime.to_tokens_last(src, width)
        assert xt.shape == (shape[1], -(-shape[0] // width) * width) and xt.dtype == torch.float32
        torch.testing.assert_close(xt[:, :shape[0]], x.t(), rtol=0, atol=0)
        assert not xt[:, shape[0]:].any()
        back = tvm_runtime.from_tokens_last(xt.clone(), shape[0])
        assert back.shape == shape and back.dtype == torch.float32
        torch.testing.assert_close(back, x, rtol=0, atol=0)


def test_wrong_dtype_is_a_clear_error():
    w, enc = _layer(8, 16, 0.5, 0.0)
    with pytest.raises(InputError, match="tvm runtime: input is torch.float64 but the layer.s weights are torch.float32"):
        tvm_runtime.KERNELS["condensed_linear"](torch.randn(1, 16, dtype=torch.float64), enc.values, enc.indices, None,
                                                None, 8)


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,hw", [
    (8, 16, 3, 1, 1, 1, 1, (9, 11)), (16, 32, 1, 1, 0, 1, 1, (7, 7)), (16, 8, 1, 2, 0, 1, 1, (8, 8)),
    (8, 16, 3, 2, 1, 1, 2, (10, 10)), (12, 12, 3, 1, 1, 1, 12, (6, 5)), (4, 8, 5, 1, 2, 2, 1, (12, 12)),
    # strided, on phase planes: odd sizes, a 7x7 stem, stride 3 without padding, stride with dilation
    (8, 16, 3, 2, 1, 1, 1, (9, 11)), (3, 16, 7, 2, 3, 1, 1, (15, 16)), (6, 8, 3, 3, 0, 1, 1, (13, 10)),
    (6, 8, 3, 2, 2, 2, 1, (11, 12)), (8, 8, 2, 2, 0, 1, 1, (8, 9))])
@pytest.mark.parametrize("batch", [1, 2])
def test_condensed_conv2d(cin, cout, k, stride, padding, dilation, groups, hw, batch):
    conv = torch.nn.Conv2d(cin, cout, k, stride, padding, dilation, groups)
    w = conv.weight.detach()
    mask = fanin_mask(w, 0.75, ablate=0.25)
    rows = mask.reshape(cout, -1)
    enc = formats.encode_fanin((w * mask).reshape(cout, -1), rows, int(rows.sum(1).max()))
    x = torch.randn(batch, cin, *hw)
    y = tvm_runtime.KERNELS["condensed_conv2d"](x, enc.values, enc.indices, enc.rows, conv.bias.detach(), cout, [k, k],
                                     [stride] * 2, [padding] * 2, [dilation] * 2, groups)
    assert_equivalent(y, F.conv2d(x, w * mask, conv.bias.detach(), stride, padding, dilation, groups))


@pytest.mark.parametrize("kernel,stride,padding,dilation,hw", [
    ((3, 3), (2, 1), (1, 0), (1, 1), (9, 8)), ((1, 3), (2, 2), (0, 1), (1, 1), (7, 7)),
    ((5, 3), (1, 2), (2, 1), (1, 2), (9, 9)), ((5, 3), (3, 2), (0, 2), (1, 1), (13, 10))])
def test_condensed_conv2d_uneven_geometry(kernel, stride, padding, dilation, hw):
    """Strides, paddings and dilations that differ between rows and columns: each phase plane's interior,
    offsets and trailing zeros are per axis."""
    conv = torch.nn.Conv2d(6, 10, kernel, stride, padding, dilation)
    w = conv.weight.detach()
    mask = fanin_mask(w, 0.7)
    rows = mask.reshape(10, -1)
    enc = formats.encode_fanin((w * mask).reshape(10, -1), rows, int(rows.sum(1).max()))
    bound = tvm_runtime.BoundConv2d(enc.values, enc.indices, enc.rows, conv.bias.detach(), 10, list(kernel),
                                    list(stride), list(padding), list(dilation), 1, 6)
    assert bound.direct
    bound.tune = False
    for seed in range(2):
        x = torch.randn(1, 6, *hw, generator=torch.Generator().manual_seed(seed))
        assert_equivalent(bound(x), F.conv2d(x, w * mask, conv.bias.detach(), stride, padding, dilation))


@pytest.mark.parametrize("k,stride,padding,groups", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (1, 2, 0, 1),
                                                     (3, 1, 1, 2), (4, 4, 0, 1)])
def test_channels_last_inputs_get_channels_last_answers(k, stride, padding, groups):
    """A channels-last input (a `precision="bf16"` convnet's activations) is taken as it is, on every path
    (phase planes, 1x1, im2col), and answered in channels-last, as torch's convolution answers it."""
    conv = torch.nn.Conv2d(8, 12, k, stride, padding, groups=groups)
    w = conv.weight.detach()
    mask = fanin_mask(w, 0.7)
    rows = mask.reshape(12, -1)
    enc = formats.encode_fanin((w * mask).reshape(12, -1), rows, int(rows.sum(1).max()))
    bound = tvm_runtime.BoundConv2d(enc.values, enc.indices, enc.rows, conv.bias.detach(), 12, [k, k], [stride] * 2,
                                    [padding] * 2, [1, 1], groups, 8)
    bound.tune = False
    for batch in (1, 2):
        x = torch.randn(batch, 8, 12, 12).contiguous(memory_format=torch.channels_last)
        y, expected = bound(x), F.conv2d(x, w * mask, conv.bias.detach(), stride, padding, 1, groups)
        assert y.shape == expected.shape and y.dtype == expected.dtype
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        assert_equivalent(y, expected)


@pytest.mark.parametrize("slots", [64, 1])
def test_reused_zero_buffers_stay_zero_where_no_call_writes(slots, monkeypatch):
    """The direct 3x3 path's padded planes and the 1x1 path's padding-token columns live in per-thread buffers
    kept zero outside what each call writes: calls after the first (other inputs, another layer of the same
    shape, inputs of other sizes, and a cap of one buffer that starts over) equal the dense op every time."""
    monkeypatch.setattr(tvm_runtime, "ZEROED_SLOTS", slots)
    layers = []
    # A stride-2 layer on the same input as a stride-1 one: its phase planes are another buffer.
    for cin, cout, k, padding, stride in ((8, 16, 3, 1, 1), (8, 16, 3, 1, 1), (16, 8, 1, 0, 1), (8, 16, 3, 1, 2)):
        conv = torch.nn.Conv2d(cin, cout, k, stride, padding)
        w = conv.weight.detach()
        mask = fanin_mask(w, 0.7)
        enc = formats.encode_fanin((w * mask).reshape(cout, -1), mask.reshape(cout, -1),
                                   int(mask.reshape(cout, -1).sum(1).max()))
        bound = tvm_runtime.BoundConv2d(enc.values, enc.indices, enc.rows, conv.bias.detach(), cout, [k, k],
                                        [stride] * 2, [padding] * 2, [1, 1], 1, cin)
        bound.tune = False
        layers.append((bound, w * mask, conv.bias.detach(), padding, cin, stride))
    for hw in ((7, 7), (7, 7), (9, 6), (7, 7)):
        for bound, w, b, padding, cin, stride in layers:
            x = torch.randn(1, cin, *hw) * 10
            y = bound(x)
            expected = F.conv2d(x, w, b, stride, padding)
            assert y.shape == expected.shape and y.dtype == expected.dtype
            assert_equivalent(y, expected)


def test_four_threads_share_one_compiled_model():
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10)).eval()
    masks = {"0.weight": fanin_mask(model[0].weight, 0.9), "2.weight": fanin_mask(model[2].weight, 0.8)}
    inputs = [torch.randn(t, 64) for t in (1, 1, 9, 17)]
    compiled = sparsecc.compile(model, (inputs[0],), masks=masks, backend="tvm")
    with torch.no_grad():
        expected = [compiled(x) for x in inputs]
    results: dict[int, list] = {}

    def work(i):
        with torch.no_grad():
            results[i] = [compiled(x) for _ in range(20) for x in inputs]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for j, y in enumerate(results[i]):
            assert torch.equal(y, expected[j % len(inputs)])


_CHILD = """
import json, torch, torch.nn.functional as F
from sparsecc.core import formats
from sparsecc.runtimes import tuning
from sparsecc.runtimes.tvm import runtime as rt
torch.manual_seed(0)
w = torch.randn(16, 48); m = torch.zeros_like(w, dtype=torch.bool); m[:, ::4] = True
enc = formats.encode_fanin(w * m, m, 12)
tuning.disable(enc.values)   # the kernel runs whatever a measurement would choose
x = torch.randn(1, 48)   # one token: one kernel (the token path adds the transpose kernel)
y = rt.KERNELS["condensed_linear"](x, enc.values, enc.indices, None, None, 16)
assert torch.allclose(y, F.linear(x, w * m), rtol=0, atol=1e-5 * float(F.linear(x, w * m).abs().max())), "mismatch"
print(json.dumps(rt.kernel_cache().stats))
"""


def _children(cache_dir, n=1):
    """Run the kernel in ``n`` fresh processes at once (a process never reloads a library path it has
    loaded, so cache loading is tested across processes); returns their cache statistics."""
    env = {**os.environ, "SPARSECC_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    stats = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        stats.append(json.loads(out.strip().splitlines()[-1]))
    return stats


@pytest.mark.slow
def test_cache_hit_from_disk(tmp_path):
    assert _children(tmp_path) == [{"memory": 0, "disk": 0, "built": 1, "rebuilt": 0}]
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1
    assert _children(tmp_path) == [{"memory": 0, "disk": 1, "built": 0, "rebuilt": 0}]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "foreign", "sidecar"])
def test_corrupt_or_foreign_entry_is_rebuilt(tmp_path, damage):
    _children(tmp_path)
    so = next((tmp_path / "kernels").glob("*.so"))
    target, content = {
        "truncate": (so, so.read_bytes()[:100]),
        "foreign": (so, Path(sys.executable).read_bytes()[:4096]),
        "sidecar": (so.with_suffix(".json"), b'{"function": "something else"}'),
    }[damage]
    target.write_bytes(content)
    assert _children(tmp_path) == [{"memory": 0, "disk": 0, "built": 1, "rebuilt": 1}]
    assert _children(tmp_path) == [{"memory": 0, "disk": 1, "built": 0, "rebuilt": 0}]


@pytest.mark.slow
def test_concurrent_compiles_in_two_processes(tmp_path):
    stats = _children(tmp_path, n=2)
    assert all(s["built"] + s["disk"] == 1 for s in stats)
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1
    assert not list((tmp_path / "kernels").glob(".*")), "temporary files left behind"


def test_auto_backend_uses_tvm_and_reports_it():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32)).eval()
    compiled = sparsecc.compile(model, (torch.randn(1, 32),), masks={"0.weight": fanin_mask(model[0].weight, 0.9)})
    assert compiled.report.runtime == "tvm"
    assert compiled.report.layers[0].runtime == "tvm"
    assert get_runtime("tvm").supports("condensed_linear", torch.float32)


def test_unsupported_dtype_falls_back_to_reference_with_a_note():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16)).double().eval()
    x = torch.randn(2, 32, dtype=torch.float64)
    masks = {"0.weight": fanin_mask(model[0].weight, 0.75)}
    compiled = sparsecc.compile(model, (x,), masks=masks, backend="tvm")
    layer = compiled.report.layers[0]
    assert layer.runtime == "reference"
    assert layer.reason == "tvm has no condensed_linear kernel for float64: runs on reference"
    with torch.no_grad():
        assert_equivalent(compiled(x), sparsecc.masked_reference(model, masks)(x))


@pytest.mark.parametrize("in_f", [64, 48, 40, 12])     # AVX kernel, AVX with a tail block, select, fan-in path
@pytest.mark.parametrize("tokens", [1, 2, 11])
@pytest.mark.parametrize("bias", [True, False])
def test_nm_linear(in_f, tokens, bias):
    from sparsecc.tooling.synthetic import nm_mask

    w = torch.randn(20, in_f)
    mask = nm_mask(w)
    values, metadata = formats.encode_nm(w * mask, mask)
    b = torch.randn(20) if bias else None
    x = torch.randn(tokens, in_f)
    y = tvm_runtime.KERNELS["nm_linear"](x, values, metadata, b, in_f)
    assert_equivalent(y, F.linear(x, w * mask, b))


@pytest.mark.parametrize("tokens", [1, 11])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nm_linear_in_16_bit(tokens, dtype):
    """A bf16 / fp16 2:4 layer against the dense op in its dtype: the 2:4 kernel at one token, the fan-in path
    with its 16-bit input (no float32 copy) at many."""
    from sparsecc.tooling.synthetic import nm_mask

    w = torch.randn(20, 64)
    mask = nm_mask(w)
    values, metadata = formats.encode_nm(w * mask, mask)
    bound = tvm_runtime.BoundNM(values.to(dtype), metadata, torch.randn(20).to(dtype), 64)
    bound.tune = False
    x = torch.randn(tokens, 64).to(dtype)
    assert bound.native(x) == (tokens >= tvm_runtime.SPMM_MIN_TOKENS)
    y = bound(x)
    expected = F.linear(x, (w * mask).to(dtype), bound.bias_or_none)
    assert y.shape == expected.shape and y.dtype == dtype
    assert_equivalent(y, expected)


def test_nm_kernel_choice_by_shape():
    from tvm.target import codegen

    avx = codegen.target_has_features("avx", tvm_runtime.kernel_cache().target)
    assert tvm_runtime.BoundNM(torch.zeros(4, 32), torch.zeros(4, 8, dtype=torch.uint8), None, 64).kind == \
        ("nm_gemv_avx" if avx else "nm_gemv")
    assert tvm_runtime.BoundNM(torch.zeros(4, 6), torch.zeros(4, 2, dtype=torch.uint8), None, 12).kind is None


@pytest.mark.parametrize("out_f,in_f,sparsity,ablate", [
    (64, 128, 0.7, 0.1),      # whole 32-input words, ablated rows
    (40, 100, 0.5, 0.0),      # in_features padded to 128
    (9, 24, 0.95, 0.3),       # one word per row, k = 1
    (33, 4096, 0.9, 0.2),     # many words, a remainder after the 4-chain groups (4096 / 32 = 128: none; k odd)
    (17, 3000, 0.7, 0.0),     # 94 words: a remainder of 2 words
])
@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bitmask_one_token_form(out_f, in_f, sparsity, ablate, tokens, bias, dtype):
    """The bit-mask one-token kernel (bf16 values expanded from their mask words, even and odd inputs apart;
    fp16 values converted as the word's two halves) against the dense op in the layer's dtype, forced whatever
    the measurement would pick (LLVM emulates the expanding load on CPUs without AVX512_VBMI2, so it is checked
    everywhere); from a float32 input and from the layer's own dtype."""
    w, enc = _layer(out_f, in_f, sparsity, ablate)
    w, values = w.to(dtype), enc.values.to(dtype)
    b = torch.randn(out_f, dtype=dtype) if bias else None
    bound = tvm_runtime.BoundLinear(values, enc.indices, enc.rows, b, out_f)
    x = torch.randn(tokens, in_f, dtype=dtype)
    y = bound.sparse(x.float(), "bitmask").to(dtype)
    expected = F.linear(x, w, b)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert_equivalent(y, expected)
    assert_equivalent(bound.sparse(x.float(), "gather").to(dtype), expected)
    for form in ("bitmask", "gather"):      # the input in its own dtype, split / widened inside the kernel
        native = bound.sparse(x, form)
        assert native.shape == expected.shape and native.dtype == dtype
        assert_equivalent(native, expected)
        torch.testing.assert_close(native, bound.sparse(x.float(), form).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2])
def test_one_token_kernels_read_and_write_the_layers_dtype(dtype, tokens):
    """A bf16 / fp16 layer's one-token call goes to the kernel in its own dtype (no float32 copy of the input
    or output) and equals the dense op in that dtype; the layer called as a model calls it too."""
    out_f, in_f = 48, 200
    w, enc = _layer(out_f, in_f, 0.8, 0.1)
    w, values = w.to(dtype), enc.values.to(dtype)
    b = torch.randn(out_f, dtype=dtype)
    bound = tvm_runtime.BoundLinear(values, enc.indices, enc.rows, b, out_f)
    x = torch.randn(1, tokens, in_f, dtype=dtype)
    assert bound.native(x)
    expected = F.linear(x, w, b)
    for y in (bound.sparse(x[0]).unsqueeze(0), bound(x)):
        assert y.shape == expected.shape and y.dtype == expected.dtype
        assert_equivalent(y, expected)
    assert any(key[3] == dtype for key in bound.kernels), bound.kernels.keys()    # the kernel took the dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 16), (7, 9), (33, 40), (197, 768), (64, 17), (200, 3)])
def test_16_bit_pack_and_narrowing_unpack_are_exact(dtype, shape):
    """A bf16 input goes tokens-last in 16 bits, as words of tokens ``i`` and ``i + lanes`` of each block of two
    vectors; an fp16 one is widened to float32 tokens-last in the same pass; padding tokens zero, ragged features
    and tokens on both sides. The unpack rounds the float32 output to the dtype as ``.to`` does."""
    tokens, n = shape
    width = tvm_runtime.lanes()
    x = torch.randn(tokens, n).to(dtype)
    xt = tvm_runtime.to_tokens_last(x, width)
    if dtype == torch.bfloat16:
        padded = -(-tokens // (2 * width)) * 2 * width
        assert xt.shape == (n, padded // 2) and xt.dtype == torch.int32
        full = torch.zeros(n, padded, dtype=dtype)
        full[:, :tokens] = x.t()
        blocks = full.view(torch.int16).to(torch.int32).view(n, -1, 2, width) & 0xFFFF
        expected = blocks[:, :, 0] | (blocks[:, :, 1] << 16)
        assert torch.equal(xt, expected.reshape(n, -1))
    else:
        padded = -(-tokens // width) * width
        assert xt.shape == (n, padded) and xt.dtype == torch.float32
        torch.testing.assert_close(xt[:, :tokens], x.t().float(), rtol=0, atol=0)
        assert not xt[:, tokens:].any()
    y = torch.randn(n, padded) * 100
    back = tvm_runtime.from_tokens_last(y, tokens, dtype)
    assert back.shape == (tokens, n) and back.dtype == dtype
    torch.testing.assert_close(back, y[:, :tokens].t().to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("out_f,in_f,sparsity,ablate", [
    (64, 128, 0.9, 0.1),
    (40, 100, 0.5, 0.0),       # in_features not a multiple of the lanes: the pack's scalar tail
    (47, 300, 0.7, 0.1),       # two K chunks plus a tail, a row remainder
])
@pytest.mark.parametrize("tokens", [5, 70])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_tokens_read_the_layers_16_bit_dtype(out_f, in_f, sparsity, ablate, tokens, dtype):
    """A bf16 / fp16 layer's many-token call takes its input as it is (bf16 packed in 16 bits, two token vectors
    per 64-byte load split by a shift and a mask in the kernel; fp16 widened by the pack) and rounds its output
    in the unpack: every candidate tile (pairs of vectors for bf16, odd counts rounded down) equals the dense op
    in that dtype, and the float32 path bit for bit; the layer calls it that way."""
    w, enc = _layer(out_f, in_f, sparsity, ablate)
    w, values = w.to(dtype), enc.values.to(dtype)
    b = torch.randn(out_f, dtype=dtype)
    bound = tvm_runtime.BoundLinear(values, enc.indices, enc.rows, b, out_f)
    x = torch.randn(tokens, in_f).to(dtype)
    assert bound.native(x)
    expected = F.linear(x, w, b)
    tiles = bound.tiles(x)
    assert tiles and (dtype != torch.bfloat16 or all(t.vectors % 2 == 0 for t in tiles)), tiles
    for tile in tiles:
        y = bound.sparse(x, tile)
        assert y.shape == expected.shape and y.dtype == dtype
        assert_equivalent(y, expected)
        torch.testing.assert_close(y, bound.sparse(x.float(), tile).to(dtype), rtol=0, atol=0)
    bound.tune = False
    y = bound(x.unsqueeze(0))
    assert y.shape == (1, *expected.shape) and y.dtype == dtype
    assert_equivalent(y[0], expected)
    assert any(key[0] == "tiled" and key[3] == (dtype if dtype == torch.bfloat16 else torch.float32)
               for key in bound.kernels), bound.kernels.keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_many_token_path_at_8_lanes(dtype, monkeypatch):
    """The same path at AVX2's 8 lanes (what an AVX2 CPU runs; the host runs it too): pack, tiles and unpack."""
    monkeypatch.setattr(tvm_runtime, "lanes", lambda: 8)
    w, enc = _layer(40, 100, 0.7, 0.1)
    w, values = w.to(dtype), enc.values.to(dtype)
    bound = tvm_runtime.BoundLinear(values, enc.indices, enc.rows, None, 40)
    x = torch.randn(37, 100).to(dtype)
    expected = F.linear(x, w)
    for tile in bound.tiles(x):
        y = bound.sparse(x, tile)
        assert y.shape == expected.shape and y.dtype == dtype
        assert_equivalent(y, expected)
        torch.testing.assert_close(y, bound.sparse(x.float(), tile).to(dtype), rtol=0, atol=0)


def test_bitmask_form_is_measured_for_16_bit_values_only():
    _, enc = _layer(16, 64, 0.75, 0.0)
    x = torch.randn(1, 64)
    fp32 = tvm_runtime.BoundLinear(enc.values, enc.indices, enc.rows, None, 16)
    bf16 = tvm_runtime.BoundLinear(enc.values.to(torch.bfloat16), enc.indices, enc.rows, None, 16)
    fp16 = tvm_runtime.BoundLinear(enc.values.to(torch.float16), enc.indices, enc.rows, None, 16)
    assert fp32.tiles(x) == ()
    assert bf16.tiles(x) == fp16.tiles(x) == (("gather", "bitmask") if tvm_runtime.expands() else ())
    assert bf16.tiles(torch.randn(20, 64)) != ("gather", "bitmask")      # many tokens: register tiles
