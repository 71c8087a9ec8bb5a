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
from tests.conftest import small_cnn


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.LayerNorm(96), nn.Linear(96, 32), nn.ReLU(),
                          nn.Linear(32, 10)).eval()
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.75, ablate=0.1))
    return model


def _assert_within_stated_tolerance(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype == torch.float32
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=precision.TOLERANCE * scale)


@pytest.mark.parametrize("build,shape", [(_mlp, (5, 64)), (small_cnn, (2, 3, 12, 12))])
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


def _conv_only() -> nn.Module:
    """A convnet whose output is 4-D (a segmentation head's shape)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 8, 1)).eval()
    synthetic.attach_with_prune(model, synthetic.structured_masks(model, "fanin", 0.75))
    return model


def _converts(compiled) -> bool:
    return any(n.target is precision.to_channels_last for n in compiled.module.graph.nodes)


@pytest.mark.parametrize("build,shape", [(small_cnn, (2, 3, 12, 12)), (_conv_only, (1, 3, 16, 16)), (_mlp, (5, 64))])
def test_bf16_convnets_run_channels_last_and_answer_in_torch_layout(build, shape):
    """A convolutional network in bf16 runs on channels-last activations (oneDNN's layout for bf16
    convolutions); its outputs come back in torch's layout, for inputs in either layout. A network of Linears
    is left as it is."""
    model = build()
    x = torch.randn(*shape)
    compiled = sparsecc.compile(model, (x,), precision="bf16")
    convnet = build is not _mlp
    assert _converts(compiled) is convnet
    assert any("channels-last memory" in n for n in compiled.report.notes) is convnet
    assert compiled.report.validated
    inputs = [x, torch.randn(*shape)] + ([x.contiguous(memory_format=torch.channels_last)] if convnet else [])
    with torch.no_grad():
        for inputs in inputs:
            actual, expected = compiled(inputs), model(inputs)
            assert actual.is_contiguous()
            _assert_within_stated_tolerance(actual, expected)


def test_channels_last_converts_four_dimensional_floating_inputs_only():
    class Two(nn.Module):
        def forward(self, image, features, ids):
            return image * 2, features + 1, ids

    gm = torch.fx.symbolic_trace(Two())
    assert precision.channels_last(gm) == 3
    image, features, ids = torch.randn(2, 3, 5, 4), torch.randn(2, 7), torch.arange(6).view(1, 1, 2, 3)
    out = gm(image, features, ids)
    assert out[0].is_contiguous() and out[1].is_contiguous() and out[2] is ids
    torch.testing.assert_close(out[0], image * 2, rtol=0, atol=0)
    torch.testing.assert_close(out[1], features + 1, rtol=0, atol=0)
    assert precision.to_channels_last(image).is_contiguous(memory_format=torch.channels_last)
    assert precision.to_channels_last(features) is features and precision.to_channels_last(ids) is ids
    assert precision.convolutional(small_cnn()) and not precision.convolutional(_mlp())


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


class _Keyed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()

    def forward(self, x, scale=None):
        return {"logits": self.body(x) * scale}


@pytest.mark.parametrize("keywords", [False, True])
def test_a_saved_bf16_model_runs_in_bf16_and_returns_float32(tmp_path, keywords):
    """The `.pt2` of a ``precision="bf16"`` model carries the precision: autocast and float32 outputs are in the
    program, so the loaded model returns what the compiled one returns (not bf16 outputs, not an fp32 graph)."""
    model = _Keyed().eval() if keywords else _mlp()
    x = torch.randn(3, 64)
    call = (lambda m, t: m(x=t, scale=torch.full((len(t), 1), 2.0))["logits"]) if keywords else (lambda m, t: m(t))
    compiled = (sparsecc.compile(model, example_kwargs={"x": x, "scale": torch.full((3, 1), 2.0)}, precision="bf16")
                if keywords else sparsecc.compile(model, (x,), precision="bf16"))
    loaded = sparsecc.load(sparsecc.save(compiled, tmp_path / "bf16.pt2"))
    with torch.no_grad():
        for t in (x, torch.randn(5, 64)):
            got, want, fp32 = call(loaded, t), call(compiled, t), call(model, t)
            assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
            _assert_within_stated_tolerance(got, fp32)
            assert not torch.equal(got, fp32)


def test_exporting_a_bf16_compiled_model_is_a_clear_error(tmp_path):
    from sparsecc import ExportError

    model = _mlp()
    compiled = sparsecc.compile(model, (torch.randn(2, 64),), precision="bf16")
    for export, name in ((sparsecc.export_onnx, "m.onnx"), (sparsecc.export_tvm, "m.so")):
        with pytest.raises(ExportError, match=r"precision='bf16'.*pass the model itself.*sparsecc.save"):
            export(compiled, torch.randn(2, 64), tmp_path / name)
        assert not (tmp_path / name).exists()
    exported = sparsecc.export_onnx(model, torch.randn(2, 64), tmp_path / "fp32.onnx")   # the model itself: fp32
    assert exported.path.is_file()


def test_bf16_casts_the_dense_layers_it_keeps_once():
    """A dense Linear / convolution the model keeps (no mask) holds bf16 parameters in the compiled model, as
    autocast would cast them on every call; the user's model keeps its float32 ones and the answers agree."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10)).eval()
    synthetic.attach_with_prune(model, {"2.weight": synthetic.fanin_mask(model[2].weight, 0.75)})
    x = torch.randn(2, 3, 6, 6)
    compiled = sparsecc.compile(model, (x,), precision="bf16")
    dense = [m for m in compiled.module.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert len(dense) == 2 and all(p.dtype == torch.bfloat16 for m in dense for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any("(2 dense Linear / convolution(s) too)" in n for n in compiled.report.notes), compiled.report.notes
    with torch.no_grad():
        _assert_within_stated_tolerance(compiled(x), model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):     # what autocast computes from the float32 model
            expected = sparsecc.masked_reference(model)(x).float()
        torch.testing.assert_close(compiled(x), expected, rtol=2e-2, atol=2e-2)


class _State:
    """A state object the model hands back (as a Hugging Face cache is): pytree does not know it."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


class _Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        h = self.body[:4](x)
        return self.body[4:](h), _State(h)


def test_bf16_state_objects_stay_as_computed_and_are_validated_by_value():
    """Outputs in float32; a state object's tensor stays bf16 (what the model would read back), compared with
    the fp32 model's by value; checked without ``held_in``, the same run fails on its dtype."""
    from sparsecc.compiler.validation import run_validation

    model = _Stateful().eval()
    x = torch.randn(5, 64)
    compiled = sparsecc.compile(model, (x,), precision="bf16")
    assert compiled.report.validated
    with torch.no_grad():
        (out, state), (want, want_state) = compiled(x), model(x)
    _assert_within_stated_tolerance(out, want)
    assert state.hidden.shape == want_state.hidden.shape
    assert state.hidden.dtype == torch.bfloat16 and want_state.hidden.dtype == torch.float32
    torch.testing.assert_close(state.hidden.float(), want_state.hidden, rtol=0.0,
                               atol=precision.TOLERANCE * float(want_state.hidden.abs().max()))
    held = sparsecc.validate(model, compiled, (x,))
    assert held.ok and any("held in bfloat16" in s.what for s in held.end_to_end), held.end_to_end
    strict = run_validation(model, precision.AtPrecision(compiled.module, torch.bfloat16), [(x,)],
                            tolerance=precision.TOLERANCE, weights_from=sparsecc.masked_reference(model))
    assert not strict.ok and "dtype torch.bfloat16 != reference torch.float32" in strict.message()


@pytest.mark.parametrize("isa,slow", [(("avx", "avx2", "fma", "f16c"), True),
                                      (("avx", "avx2", "avx512f", "avx512_bf16"), False),
                                      (("avx", "avx2", "amx_bf16", "amx_tile"), False),
                                      (("asimd",), False)], ids=str)
def test_bf16_on_a_cpu_without_bf16_arithmetic_says_so(monkeypatch, isa, slow):
    """precision="bf16" is honoured everywhere; on an x86 CPU with neither AVX512_BF16 nor AMX the report says it
    runs slower than the default there (measured: 0.52-0.65x of fp32 sparsecc on an AVX2 EPYC), elsewhere not."""
    monkeypatch.setattr("sparsecc.runtimes.cpu.isa", lambda: isa)
    model = _mlp()
    x = torch.randn(5, 64)
    compiled = sparsecc.compile(model, (x,), precision="bf16", backend="reference")
    said = [note for note in compiled.report.notes if "no bf16 arithmetic" in note]
    assert bool(said) == slow, compiled.report.notes
    if slow:
        assert "default precision" in said[0] and "AVX512_BF16" in said[0]
    _assert_within_stated_tolerance(compiled(x), model(x))
    default = sparsecc.compile(model, (x,), backend="reference")
    assert not any("no bf16 arithmetic" in note for note in default.report.notes)
