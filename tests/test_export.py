"""ONNX export (condensed and dense), the 2:4 check, the onnxruntime engine, and the TensorRT path up to the
GPU boundary. Every ONNX run is compared with the masked dense torch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import sparsecc
from sparsecc.core.layers import CondensedLayer
from sparsecc.runtimes.onnxruntime import forms
from sparsecc.runtimes.tensorrt import engine as trt_runtime
from sparsecc.tooling import synthetic
from sparsecc.tooling.demo import build
from tests.conftest import assert_equivalent
from tests.unexportable import Unexportable


def _run(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outs = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
    return torch.from_numpy(outs[0])


def _mlp():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    masks = synthetic.fanin_masks(model, 0.75, ablate=0.25)
    return model, masks


# -- export forms: torch modules equal to the condensed layers --------------------------------------------------

def _condensed_layers(compiled):
    return [m for m in compiled.module.modules() if isinstance(m, CondensedLayer)]


@pytest.mark.parametrize("form", ["gather", "rows", "dense"])
def test_linear_forms_equal_masked_layer_with_ablated_rows(form):
    lin = nn.Linear(12, 6)
    mask = torch.zeros(6, 12, dtype=torch.bool)
    mask[0, [0, 5, 11]] = mask[2, [1, 2, 3]] = mask[3, [4, 6, 8]] = mask[5, [7, 9, 10]] = True  # rows 1, 4 ablated
    model = nn.Sequential(lin).eval()
    compiled = sparsecc.compile(model, torch.randn(1, 12), masks={"0.weight": mask}, backend="reference")
    layer = _condensed_layers(compiled)[0]
    assert layer.rows is not None and layer.rows.tolist() == [0, 2, 3, 5]
    exported = forms.FORMS[form](layer)
    x = torch.randn(3, 5, 12)
    expected = F.linear(x, lin.weight * mask, lin.bias)
    with torch.no_grad():
        assert_equivalent(exported(x), expected)
        # an ablated neuron emits exactly its bias
        assert torch.equal(exported(x)[..., 1], lin.bias[1].expand(3, 5))


def test_all_ablated_layer_exports_its_bias():
    lin = nn.Linear(8, 4)
    compiled = sparsecc.compile(nn.Sequential(lin).eval(), torch.randn(1, 8),
                                masks={"0.weight": torch.zeros(4, 8, dtype=torch.bool)}, backend="reference")
    layer = _condensed_layers(compiled)[0]
    for form in ("gather", "rows"):
        exported = forms.FORMS[form](layer)
        x = torch.randn(2, 8)
        with torch.no_grad():
            assert_equivalent(exported(x), lin.bias.detach().expand(2, 4))


@pytest.mark.parametrize("form", ["rows", "dense"])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_forms_equal_masked_conv_batched_and_unbatched(form, groups):
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=groups)
    mask = synthetic.fanin_mask(conv.weight, 0.5, ablate=0.34)
    assert bool((mask.flatten(1).sum(1) == 0).any())
    compiled = sparsecc.compile(nn.Sequential(conv).eval(), torch.randn(1, 8, 9, 9), masks={"0.weight": mask},
                                backend="reference")
    exported = forms.FORMS[form](_condensed_layers(compiled)[0])
    with torch.no_grad():
        for x in (torch.randn(2, 8, 9, 9), torch.randn(8, 9, 9)):
            assert_equivalent(exported(x), F.conv2d(x, conv.weight * mask, conv.bias, 2, 1, 1, groups))


@pytest.mark.slow
def test_auto_formulation_picks_what_onnxruntime_runs_fastest(tmp_path):
    model = nn.Sequential(nn.Linear(3072, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 8)).eval()
    masks = {"0.weight": synthetic.fanin_mask(model[0].weight, 0.99),              # k = 31 <= 3072 / 60
             "2.weight": synthetic.fanin_mask(model[2].weight, 0.5, ablate=0.6),   # 24 of 40 rows ablated
             "4.weight": synthetic.fanin_mask(model[4].weight, 0.5, ablate=0.3)}   # 2 of 8 ablated: 25%
    # narrow=False: the ablated rows stay for the formulations to handle (narrowing would remove them)
    one_token = sparsecc.export_onnx(model, torch.randn(1, 3072), tmp_path / "a.onnx", masks=masks, narrow=False)
    assert one_token.forms == {"0.weight": "gather", "2.weight": "rows", "4.weight": "rows"}
    tokens = sparsecc.export_onnx(model, torch.randn(1, 10, 3072), tmp_path / "b.onnx", masks=masks, narrow=False)
    assert tokens.forms == {"0.weight": "dense", "2.weight": "rows", "4.weight": "dense"}
    x = torch.randn(2, 10, 3072)
    with torch.no_grad():
        assert_equivalent(_run(tokens.path, x), sparsecc.masked_reference(model, masks)(x))
    unablated = masks | {"4.weight": synthetic.fanin_mask(model[4].weight, 0.5)}
    assert sparsecc.export_onnx(model, torch.randn(1, 3072), tmp_path / "c.onnx", masks=unablated,
                                narrow=False).forms["4.weight"] == "dense"


def test_auto_formulation_for_convolutions(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1)).eval()
    masks = {"0.weight": synthetic.fanin_mask(model[0].weight, 0.5, ablate=0.5),
             "2.weight": synthetic.fanin_mask(model[2].weight, 0.5, ablate=0.1)}
    result = sparsecc.export_onnx(model, torch.randn(1, 8, 6, 6), tmp_path / "c.onnx", masks=masks, narrow=False)
    assert result.forms == {"0.weight": "rows", "2.weight": "dense"}
    x = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        assert_equivalent(_run(result.path, x), sparsecc.masked_reference(model, masks)(x))


# -- ONNX round trips ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,formulation", [("condensed", "gather"), ("condensed", "rows"),
                                              ("condensed", "auto"), ("dense", "auto")])
def test_mlp_round_trip_dynamic_batch(tmp_path, mode, formulation):
    model, masks = _mlp()
    path = tmp_path / "mlp.onnx"
    result = sparsecc.export_onnx(model, torch.randn(1, 64), path, mode=mode, formulation=formulation, masks=masks,
                                  narrow=False)
    assert result.path == path and path.is_file()
    onnx.checker.check_model(str(path), full_check=True)
    expected_form = {"gather": "gather", "rows": "rows", "auto": "rows"}[formulation] if mode == "condensed" \
        else "dense"     # auto: 25% of the rows are ablated, one token: rows pays
    assert set(result.forms.values()) == {expected_form}
    batch_dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    reference = sparsecc.masked_reference(model, masks)
    for batch in (1, 3):
        x = torch.randn(batch, 64)
        with torch.no_grad():
            assert_equivalent(_run(path, x), reference(x))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if expected_form == "gather":
        assert {"Gather", "Mul", "ReduceSum"} <= ops
        assert not ops & {"Gemm", "MatMul"}
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(path)).graph.node)   # no custom op library


def test_condensed_gather_file_is_smaller_than_dense(tmp_path):
    model = nn.Sequential(nn.Linear(1024, 256)).eval()
    masks = {"0.weight": synthetic.fanin_mask(model[0].weight, 0.95)}
    gather = sparsecc.export_onnx(model, torch.randn(1, 1024), tmp_path / "g.onnx", formulation="gather", masks=masks)
    dense = sparsecc.export_onnx(model, torch.randn(1, 1024), tmp_path / "d.onnx", mode="dense", masks=masks)
    assert gather.bytes < dense.bytes / 5


def test_export_of_a_compiled_tvm_model(tmp_path):
    model, masks = _mlp()
    compiled = sparsecc.compile(model, torch.randn(1, 64), masks=masks, backend="tvm")
    path = sparsecc.export_onnx(compiled, torch.randn(1, 64), tmp_path / "c.onnx").path
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_equivalent(_run(path, x), sparsecc.masked_reference(model, masks)(x))
        assert_equivalent(compiled(x), sparsecc.masked_reference(model, masks)(x))   # the model still works


def test_fp16_dense_export(tmp_path):
    model, masks = _mlp()
    path = sparsecc.export_onnx(model, torch.randn(1, 64), tmp_path / "h.onnx", mode="dense", precision="fp16",
                                masks=masks).path
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert {i.data_type for i in graph.initializer} == {TensorProto.FLOAT16}
    x = torch.randn(3, 64).half()
    with torch.no_grad():
        expected = sparsecc.masked_reference(model, masks).half()(x)
    assert_equivalent(_run(path, x), expected)


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_resnet18_round_trip(tmp_path, structure):
    model = build("resnet18")
    masks = synthetic.structured_masks(model, structure, 0.9, 0.1, synthetic.all_but_stem)
    x = torch.randn(1, 3, 64, 64)
    mode = "condensed" if structure == "fanin" else "dense"
    result = sparsecc.export_onnx(model, x, tmp_path / "r18.onnx", mode=mode, masks=masks)
    assert len(result.forms) == 19
    reference = sparsecc.masked_reference(model, masks)
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            assert_equivalent(_run(result.path, xb), reference(xb))
    if structure == "2:4":
        checks = {c.initializer: c for c in sparsecc.check_2to4(result.path)}
        pruned = [c for c in checks.values() if c.op == "Conv" and c.sparsity >= 0.5]
        assert len(pruned) == 19 and all(c.ok and c.axis == 1 for c in pruned)


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_vit_b_16_round_trip(tmp_path, structure):
    model = build("vit_b_16", image_size=64)
    masks = synthetic.structured_masks(model, structure, 0.9, 0.05, synthetic.vit_encoder)
    mode = "condensed" if structure == "fanin" else "dense"
    result = sparsecc.export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / "vit.onnx", mode=mode, masks=masks)
    assert len(result.forms) == 48
    reference = sparsecc.masked_reference(model, masks)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            assert_equivalent(_run(result.path, x), reference(x))
    if structure == "2:4":
        pruned = [c for c in sparsecc.check_2to4(result.path) if c.sparsity >= 0.5]
        assert len(pruned) == 48 and all(c.ok for c in pruned)


# -- check_2to4 ---------------------------------------------------------------------------------------------------

def _one_node_model(path, op, weight, **attrs):
    x_shape = {"Conv": [1, weight.shape[1], 4, 4], "MatMul": [1, weight.shape[0]],
               "Gemm": [1, weight.shape[1] if attrs.get("transB") else weight.shape[0]]}[op]
    node = helper.make_node(op, ["x", "w"], ["y"], name=f"the_{op.lower()}", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight.astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _two_four(shape, axis):
    """A 2:4 pattern along ``axis``: positions 1 and 2 of each group of 4 kept."""
    keep = (np.arange(shape[axis]) % 4 == 1) | (np.arange(shape[axis]) % 4 == 2)
    view = [1] * len(shape)
    view[axis] = -1
    return np.ones(shape) * keep.reshape(view) * 3.0


@pytest.mark.parametrize("op,shape,attrs,axis", [
    ("Conv", (8, 16, 3, 3), {}, 1),
    ("MatMul", (16, 8), {}, 0),
    ("Gemm", (8, 16), {"transB": 1}, 1),
    ("Gemm", (16, 8), {}, 0),
])
def test_check_2to4_reads_the_axis_tensorrt_reads(tmp_path, op, shape, attrs, axis):
    good = _one_node_model(tmp_path / "good.onnx", op, _two_four(shape, axis), **attrs)
    [entry] = sparsecc.check_2to4(good)
    assert entry.ok and entry.axis == axis and entry.sparsity == 0.5 and entry.node == f"the_{op.lower()}"
    other = 1 - axis if op != "Conv" else 0
    wrong = _one_node_model(tmp_path / "wrong.onnx", op, _two_four(shape, other), **attrs)
    [bad] = sparsecc.check_2to4(wrong)
    assert not bad.ok and f"along axis {axis} keep more than 2" in bad.reason


def test_check_2to4_names_the_first_offending_group(tmp_path):
    w = _two_four((4, 8), 1)
    w[2, 4:8] = [1.0, 1.0, 1.0, 0.0]
    [entry] = sparsecc.check_2to4(_one_node_model(tmp_path / "m.onnx", "Gemm", w, transB=1))
    assert not entry.ok and "1 group(s)" in entry.reason and "first at [2, 4:8]: 3 of 4" in entry.reason


def test_check_2to4_k_not_a_multiple_of_4(tmp_path):
    [entry] = sparsecc.check_2to4(_one_node_model(tmp_path / "m.onnx", "Gemm", np.zeros((4, 6)), transB=1))
    assert not entry.ok and "K = 6 along axis 1 is not a multiple of 4" in entry.reason


def test_check_2to4_on_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(sparsecc.InputError, match="is not a file"):
        sparsecc.check_2to4(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model\xff" * 10)
    with pytest.raises(sparsecc.InputError, match="is not an ONNX model"):
        sparsecc.check_2to4(tmp_path / "junk.onnx")


def test_dense_export_warns_per_layer_tensorrt_cannot_use(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
                          nn.Linear(6, 4)).eval()
    along_out = synthetic.nm_mask(model[2].weight.t().contiguous()).t()       # 2:4 along the output axis
    masks = {"0.weight": synthetic.nm_mask(model[0].weight), "2.weight": along_out,
             "6.weight": synthetic.fanin_mask(model[6].weight, 0.5)}            # K = 6: no groups of 4
    with pytest.warns(sparsecc.SparseccWarning) as record:
        result = sparsecc.export_onnx(model, torch.randn(1, 16), tmp_path / "w.onnx", mode="dense", masks=masks)
    messages = sorted(str(w.message) for w in record if issubclass(w.category, sparsecc.SparseccWarning))
    assert len(messages) == 2 and all("TensorRT will run it dense" in m for m in messages)
    assert "(2.weight)" in messages[0] and "keep more than 2" in messages[0]
    assert "(6.weight)" in messages[1] and "K = 6 along axis 1 is not a multiple of 4" in messages[1]
    assert result.path.is_file()
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert_equivalent(_run(result.path, x), sparsecc.masked_reference(model, masks)(x))


# -- bad input ----------------------------------------------------------------------------------------------------

def test_unknown_ops_listed_in_one_error_and_no_file_left(tmp_path):
    model = Unexportable().eval()
    path = tmp_path / "u.onnx"
    with pytest.raises(sparsecc.ExportError) as err:
        sparsecc.export_onnx(model, torch.randn(1, 8), path, masks={"fc.weight": synthetic.fanin_mask(
            model.fc.weight, 0.5)})
    message = str(err.value)
    assert "2 op(s) have no ONNX translation" in message
    assert "sparsecc_test.first_unknown" in message and "sparsecc_test.second_unknown" in message
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    model, masks = _mlp()

    def broken_check(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken_check)
    with pytest.raises(sparsecc.ExportError, match="m.onnx: the ONNX checker refuses the file") as err:
        sparsecc.export_onnx(model, torch.randn(1, 64), tmp_path / "m.onnx", masks=masks)
    assert isinstance(err.value.__cause__, onnx.checker.ValidationError)
    assert list(tmp_path.iterdir()) == []


def test_bf16_convolutions_are_refused_with_the_way_out(tmp_path):
    """ONNX (opset 18) has no bfloat16 Conv: the checker's refusal becomes an `ExportError` that says to export
    in float32 (or fp16), no file is left, and the float32 model exports."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    synthetic.attach_with_prune(model, synthetic.structured_masks(model, "fanin", 0.5))
    model = sparsecc.masked_reference(model)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(sparsecc.ExportError, match=r"no bfloat16 form.*export the model in float32"):
        sparsecc.export_onnx(model.bfloat16(), (x.bfloat16(),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    model = model.float()
    exported = sparsecc.export_onnx(model, (x,), tmp_path / "m.onnx")
    got = _run(exported.path, x)
    with torch.no_grad():
        want = model(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_existing_file_survives_a_failed_export(tmp_path):
    path = tmp_path / "u.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(sparsecc.ExportError):
        sparsecc.export_onnx(Unexportable().eval(), torch.randn(1, 8), path)
    assert path.read_bytes() == b"previous"


@pytest.mark.parametrize("where,message", [
    ("missing/dir/m.onnx", "does not exist"),
    ("/proc/m.onnx", "is not writable"),
])
def test_unwritable_paths(tmp_path, where, message):
    model, masks = _mlp()
    path = Path(where) if where.startswith("/") else tmp_path / where
    with pytest.raises(sparsecc.ExportError, match=message):
        sparsecc.export_onnx(model, torch.randn(1, 64), path, masks=masks)


def test_directory_as_path(tmp_path):
    model, masks = _mlp()
    with pytest.raises(sparsecc.ExportError, match="is a directory"):
        sparsecc.export_onnx(model, torch.randn(1, 64), tmp_path, masks=masks)


@pytest.mark.parametrize("kwargs,message", [({"mode": "sparse"}, "mode='sparse'"),
                                            ({"formulation": "csr"}, "formulation='csr'"),
                                            ({"precision": "int8"}, "precision='int8'")])
def test_bad_arguments(tmp_path, kwargs, message):
    model, masks = _mlp()
    with pytest.raises(sparsecc.InputError, match=message):
        sparsecc.export_onnx(model, torch.randn(1, 64), tmp_path / "m.onnx", masks=masks, **kwargs)


# -- onnxruntime engine -------------------------------------------------------------------------------------------

class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(512, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return {"hidden": h, "logits": self.b(h)}


def test_onnxruntime_engine_follows_torch_thread_count():
    model = _TwoOutputs().eval()
    masks = {"a.weight": synthetic.fanin_mask(model.a.weight, 0.9)}
    compiled = sparsecc.compile(model, torch.randn(1, 512), masks=masks, backend="onnxruntime")
    before = torch.get_num_threads()
    x = torch.randn(3, 512)
    expected = model(x)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                out = compiled(x)
            for key in expected:
                assert out[key].shape == expected[key].shape and out[key].dtype == expected[key].dtype
                torch.testing.assert_close(out[key], sparsecc.masked_reference(model, masks)(x)[key], rtol=1e-4,
                                           atol=1e-5)
            assert compiled.module._get().get_session_options().intra_op_num_threads == n
    finally:
        torch.set_num_threads(before)
    assert compiled.module.threads is None and set(compiled.module._sessions) >= {1, 2}


def test_compile_backend_onnxruntime_validates_and_keeps_output_structure():
    model = _TwoOutputs().eval()
    masks = {"a.weight": synthetic.fanin_mask(model.a.weight, 0.99, ablate=0.25),
             "b.weight": synthetic.fanin_mask(model.b.weight, 0.75)}
    compiled = sparsecc.compile(model, torch.randn(1, 512), masks=masks, backend="onnxruntime",
                                runtime_options={"threads": 2})
    report = compiled.report
    assert report.engine == "onnxruntime" and report.runtime == "reference" and report.validated
    assert all(e.ok for e in report.end_to_end) and len(report.end_to_end) == 2
    assert {lay.name: lay.runtime for lay in report.condensed} == {"a.weight": "onnxruntime (gather)",
                                                                    "b.weight": "onnxruntime (dense)"}
    assert compiled.module.threads == 2
    x = torch.randn(5, 512)
    with torch.no_grad():
        out, expected = compiled(x), sparsecc.masked_reference(model, masks)(x)
    assert set(out) == {"hidden", "logits"}
    for key in out:
        assert_equivalent(out[key], expected[key])


def test_compile_backend_onnxruntime_keeps_the_file_when_asked(tmp_path):
    model, masks = _mlp()
    keep = tmp_path / "kept.onnx"
    compiled = sparsecc.compile(model, torch.randn(1, 64), masks=masks, backend="onnxruntime",
                                runtime_options={"onnx_path": keep})
    assert keep.is_file() and compiled.report.validated
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert_equivalent(_run(keep, x), sparsecc.masked_reference(model, masks)(x))


def test_engine_arguments_are_checked():
    model, masks = _mlp()
    with pytest.raises(sparsecc.InputError, match="pass example_inputs"):
        sparsecc.compile(model, masks=masks, backend="onnxruntime")
    with pytest.raises(sparsecc.InputError, match=r"\['thread'\] are not understood by onnxruntime"):
        sparsecc.compile(model, torch.randn(1, 64), masks=masks, backend="onnxruntime",
                         runtime_options={"thread": 1})
    with pytest.raises(sparsecc.InputError, match="runtime_options are for the engines"):
        sparsecc.compile(model, torch.randn(1, 64), masks=masks, backend="reference", runtime_options={"threads": 1})
    with pytest.raises(sparsecc.InputError, match="threads=0"):
        sparsecc.compile(model, torch.randn(1, 64), masks=masks, backend="onnxruntime",
                         runtime_options={"threads": 0})


# -- TensorRT up to the GPU boundary ------------------------------------------------------------------------------

needs_no_gpu = pytest.mark.skipif(trt_runtime.unavailable() is None,
                                  reason="this test checks the error raised where TensorRT cannot run")


@needs_no_gpu
def test_compile_backend_tensorrt_without_gpu_writes_onnx_and_says_how(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    masks = synthetic.nm_masks(model)
    path = tmp_path / "trt.onnx"
    with pytest.raises(sparsecc.RuntimeUnavailableError) as err:
        sparsecc.compile(model, torch.randn(1, 16), masks=masks, backend="tensorrt",
                         runtime_options={"onnx_path": path})
    message = str(err.value)
    assert f"The ONNX file is ready at {path}" in message
    assert f"trtexec --onnx={path} --sparsity=enable --fp16" in message and "force" not in message
    assert all(why in message for why in trt_runtime.missing())
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert all(c.ok for c in sparsecc.check_2to4(path))
    x = torch.randn(3, 16).half()
    with torch.no_grad():
        assert_equivalent(_run(path, x), sparsecc.masked_reference(model, masks).half()(x))


@needs_no_gpu
def test_export_tensorrt_without_gpu(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)).eval()
    masks = synthetic.nm_masks(model)
    with pytest.raises(sparsecc.RuntimeUnavailableError, match="The ONNX file is ready at"):
        sparsecc.export_tensorrt(model, torch.randn(1, 8, 6, 6), tmp_path / "conv.engine", masks=masks)
    assert (tmp_path / "conv.onnx").is_file() and not (tmp_path / "conv.engine").exists()
    [entry] = sparsecc.check_2to4(tmp_path / "conv.onnx")
    assert entry.ok and entry.op == "Conv"


def test_export_tensorrt_argument_errors(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    with pytest.raises(sparsecc.InputError, match="max_batch=0"):
        sparsecc.export_tensorrt(model, torch.randn(1, 8), tmp_path / "m.engine", max_batch=0)
    with pytest.raises(sparsecc.InputError, match="is the engine path"):
        sparsecc.export_tensorrt(model, torch.randn(1, 8), tmp_path / "m.onnx")


def test_builder_log_parsing():
    log = ["[INFO] (Sparsity) Layers eligible for sparse math: /fc1/Gemm, /conv/Conv + /relu/Relu",
           "[INFO] something else",
           "[INFO] (Sparsity) TRT inference plan picked sparse implementation for layers: /conv/Conv + /relu/Relu"]
    eligible, picked = trt_runtime.sparsity_lines(log)
    assert eligible == ["/fc1/Gemm", "/conv/Conv + /relu/Relu"] and picked == ["/conv/Conv + /relu/Relu"]
    assert trt_runtime.sparsity_lines(["(Sparsity) Layers eligible for sparse math:"]) == ([], [])


class _Recorder:
    """Stands in for TensorRT's builder objects and records what the configuration code asks of them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, *args))
            return self
        return call


class _FakeTrt:
    class BuilderFlag:
        SPARSE_WEIGHTS = "SPARSE_WEIGHTS"
        FP16 = "FP16"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5


def test_builder_configuration_sets_sparse_weights_and_dynamic_batch():
    entries = trt_runtime.profiles(["input0"], (torch.randn(4, 3, 8, 8),), max_batch=16)
    assert entries == [trt_runtime.Profile("input0", (1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))]
    builder = _Recorder()
    trt_runtime.configure(_FakeTrt, builder, None, entries)
    assert ("set_flag", "SPARSE_WEIGHTS") in builder.calls
    assert not any(c[0] == "set_flag" and c[1] == "FP16" for c in builder.calls)   # strongly typed: no flag
    assert ("set_shape", "input0", (1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8)) in builder.calls
    assert trt_runtime.network_flags(_FakeTrt) == 1 << 5
