"""The dense op's forms (`sparsecc.runtimes.dense`): every form computes torch's op, in every dtype and input
layout; a layer that runs dense by choice runs the form its measurement picked, reports it, and still equals the
user's model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

import sparsecc
from sparsecc.core import timing
from sparsecc.runtimes import dense, tuning, unavailable
from sparsecc.tooling.synthetic import fanin_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
       torch.float16: dict(rtol=2e-3, atol=5e-3)}


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, **TOL[want.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_forms_compute_f_linear(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 40, generator=g) * 0.2).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    forms = dense.LinearForms(lambda: w, b)
    inputs = [torch.randn(40, generator=g), torch.randn(1, 40, generator=g), torch.randn(3, 7, 40, generator=g),
              torch.randn(40, 5, generator=g).t(), torch.randn(0, 40)]
    for x in inputs:      # decode-sized calls: the plain op only
        assert forms.candidates(x.to(dtype), tuning.DECODE_TOKENS) == (dense.PLAIN,)
    names = {name for x in inputs for name in forms.candidates(x.to(dtype), tuning.DECODE_TOKENS + 1)}
    if dense.packs(dtype):       # laid out for 32 tokens and for one
        assert names == {dense.PLAIN, dense.PACKED, dense.PACKED_ONE}
    else:        # no packed Linear in this dtype on this CPU / torch: the plain op only
        assert names == {dense.PLAIN}
    for name in sorted(names):
        for x in inputs:
            x = x.to(dtype)
            _check(forms.form(name, x)(x), F.linear(x, w, b))
    assert forms.held() == tuple(sorted(names))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", [((1, 1), (1, 1), (1, 1), 1), ((2, 2), (0, 1), (1, 1), 1),
                                      ((1, 1), (2, 2), (2, 2), 1), ((1, 1), (1, 1), (1, 1), 2)], ids=str)
def test_conv_forms_compute_f_conv2d(dtype, geometry):
    stride, padding, dilation, groups = geometry
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(16, 8 // groups, 3, 3, generator=g) * 0.2).to(dtype)
    b = torch.randn(16, generator=g).to(dtype)
    forms = dense.ConvForms(lambda: w, b, stride, padding, dilation, groups)
    first = torch.randn(1, 8, 11, 9, generator=g).to(dtype)
    names = forms.candidates(first, 99)
    assert names == ((dense.PLAIN, dense.PACKED) if dense.packs(dtype) else (dense.PLAIN,))
    for name in names:
        fn = forms.form(name, first)           # built for the first call's shape, right on others
        for x in (first, torch.randn(2, 8, 11, 9, generator=g), torch.randn(8, 6, 13, generator=g),
                  torch.randn(1, 8, 12, 10, generator=g).transpose(2, 3)):
            x = x.to(dtype)
            _check(fn(x), F.conv2d(x, w, b, stride, padding, dilation, groups))
        # a channels-last input (`precision="bf16"` convnets run in it): the answer in channels-last too
        x = torch.randn(2, 8, 11, 9, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        got, want = fn(x), F.conv2d(x, w, b, stride, padding, dilation, groups)
        assert dense.is_channels_last(got) and dense.is_channels_last(want)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_keep_drops_unused_forms_and_the_decoded_weight():
    decoded = []
    w = torch.randn(8, 4)

    def decode():
        decoded.append(1)
        return w

    forms = dense.LinearForms(decode, None)
    x = torch.randn(2, 4)
    names = [dense.PLAIN, dense.PACKED] if dense.packs(torch.float32) else [dense.PLAIN]
    for name in names:
        forms.form(name, x)
    assert forms.held() == tuple(sorted(names)) and len(decoded) == 1
    forms.keep({names[-1]})
    assert forms.held() == (names[-1],)
    if names[-1] != dense.PLAIN:
        assert forms._weight is None           # only packed forms left: the decoded copy is gone
        forms.form(dense.PLAIN, x)             # decoded again when a form needs it
        assert len(decoded) == 2
    _check(forms.form(dense.PLAIN, x)(x), F.linear(x, w))


def test_no_packed_form_where_the_dtype_has_none():
    # fp32 and fp16 packed forms won alone and lost in a model (`dense._PACKABLE`); float64 and integers have none
    assert not any(dense.packs(d) for d in (torch.float32, torch.float16, torch.float64, torch.int32))
    forms = dense.LinearForms(lambda: torch.randn(3, 2, dtype=torch.float64), None)
    assert forms.candidates(torch.randn(5, 2, dtype=torch.float64), 5) == (dense.PLAIN,)


def _dense_wins(monkeypatch, tmp_path, fastest: str) -> None:
    """A stand-in clock in a fresh tuning cache: the dense op beats the sparse kernel, and among the dense forms
    (and the sparse kernel's tiles) ``fastest`` wins. Every measured callable still runs once, as the real
    clock's warm-up does (forms are built there)."""
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("sparsecc.runtimes.tvm.runtime._tuning", None)

    def medians(fns, **kwargs):
        for fn in fns.values():
            fn()
        if "dense" in fns:
            return {"sparse": 3e-4, "dense": 2e-4}
        return {name: 1e-4 if name == fastest else 2e-4 for name in fns}     # a form or tile search

    monkeypatch.setattr(timing, "medians", medians)


@pytest.mark.measured_choice
@pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}")
@pytest.mark.skipif(not dense.packs(torch.bfloat16), reason="this torch / CPU has no packed bf16 Linear")
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_a_layer_dense_by_choice_runs_the_measured_form(monkeypatch, tmp_path, dtype):
    """A stand-in clock: the dense op beats the sparse kernel, and the packed form beats the plain one. The
    layer then runs the packed form (its report says so), and the model still equals the user's."""
    _dense_wins(monkeypatch, tmp_path, dense.PACKED)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 8)).eval().to(dtype)
    prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.75, 0.1))
    x = torch.randn(2, 20, 64, dtype=dtype)
    compiled = sparsecc.compile(model, (x,), backend="tvm")
    entry = next(lay for lay in compiled.report.layers if lay.name == "0.weight")
    assert entry.runtime == "tvm+dense" and "dense (packed)" in entry.choice, entry.choice
    layer = compiled.module.get_submodule("0")
    bound = layer.__dict__["_bound"][2]
    (key,) = [k for k, c in bound.choices.items() if c.dense]
    assert bound.choices[key].dense_form == dense.PACKED
    assert bound.dense_forms(x).held() == (dense.PACKED,)      # the plain form measured, then dropped
    for shape in ((2, 20, 64), (3, 20, 64)):               # both in the 64-token bucket
        x = torch.randn(*shape, dtype=dtype)
        out, expected = compiled(x), model(x)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        torch.testing.assert_close(out, expected, **TOL[dtype])
    with torch.no_grad():
        masked = sparsecc.masked_reference(model)(x)
    torch.testing.assert_close(out, masked, **TOL[dtype])


@pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(48, 40), (771, 770), (5, 3)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_the_tvm_one_token_form_computes_f_linear(dtype, shape, bias):
    """The TVM runtime's dense GEMV (`runtime.GEMV16`) is offered for one-token calls of bf16 / fp16 layers only,
    and equals torch's op in that dtype: rows that do not fill a block, inputs that do not fill a vector, bias or
    none, at 1 and 2 threads."""
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    out, n = shape
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(out, n, generator=g) * 0.2).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    forms = tvm_runtime._LinearForms(lambda: w, b)
    one = torch.randn(1, 1, n, generator=g).to(dtype)
    offered = forms.candidates(one, 1)
    assert (tvm_runtime.GEMV16 in offered) == (dtype != torch.float32)
    assert tvm_runtime.GEMV16 not in forms.candidates(torch.randn(2, n).to(dtype), 2)   # two tokens: torch's
    if dtype == torch.float32:
        return
    fn = forms.form(tvm_runtime.GEMV16, one)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for x in (one, torch.randn(n, generator=g).to(dtype), torch.randn(1, n, generator=g).to(dtype)):
                _check(fn(x), F.linear(x, w, b))
                want = F.linear(x.double(), w.double(), b.double() if bias else None)
                torch.testing.assert_close(fn(x).double(), want, **TOL[dtype])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.measured_choice
@pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_a_half_layer_dense_by_choice_at_one_token_runs_the_tvm_form(monkeypatch, tmp_path, dtype, structure):
    """A stand-in clock: at one token the dense op beats the sparse kernel and the TVM GEMV beats torch's. The
    layer (fan-in or 2:4) then runs the TVM form, its report says so, and decode-sized calls still equal the
    user's model; calls of more tokens keep torch's forms."""
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    _dense_wins(monkeypatch, tmp_path, tvm_runtime.GEMV16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 8)).eval().to(dtype)
    if structure == "fanin":
        prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.75, 0.1))
    else:
        keep = model[0].weight.abs().view(96, 16, 4).argsort(-1)[..., 2:]
        mask = torch.zeros(96, 16, 4, dtype=torch.bool).scatter_(-1, keep, True).view(96, 64)
        prune.custom_from_mask(model[0], "weight", mask)
    x = torch.randn(1, 1, 64, dtype=dtype)
    compiled = sparsecc.compile(model, (x,), backend="tvm")
    entry = next(lay for lay in compiled.report.layers if lay.name == "0.weight")
    assert entry.runtime == "tvm+dense" and f"dense ({tvm_runtime.GEMV16})" in entry.choice, entry.choice
    bound = compiled.module.get_submodule("0").__dict__["_bound"][2]
    (key,) = [k for k, c in bound.choices.items() if c.dense]
    assert bound.choices[key].dense_form == tvm_runtime.GEMV16
    for shape in ((1, 1, 64), (1, 1, 64), (4, 1, 64)):       # decode steps, then a batch of 4 (torch's form)
        x = torch.randn(*shape, dtype=dtype)
        out, expected = compiled(x), model(x)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        torch.testing.assert_close(out, expected, **TOL[dtype])
        with torch.no_grad():
            torch.testing.assert_close(out, sparsecc.masked_reference(model)(x), **TOL[dtype])
