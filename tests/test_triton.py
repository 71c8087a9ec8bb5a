"""`sparsecc.export_triton`: a Triton model repository whose config.pbtxt parses with Triton's own protobuf schema
(tritonclient's model_config_pb2) and names what the ONNX graph has, whose ONNX onnxruntime runs (with the
config's thread settings) equal to the user's model at batch 1 and max_batch_size, versions added on re-export,
and bad arguments refused before anything is written."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from torch import nn

import sparsecc
from sparsecc import ExportError, InputError, RuntimeUnavailableError
from sparsecc.runtimes import unavailable
from sparsecc.runtimes.onnxruntime.engine import session
from sparsecc.tooling import cli, synthetic


def _model_config_pb2():
    """Triton's ModelConfig schema from tritonclient, loaded from its file (its package would import grpc)."""
    root = Path(importlib.util.find_spec("tritonclient").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", root / "grpc" / "model_config_pb2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PB2 = _model_config_pb2()
ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
              onnx.TensorProto.INT64: "TYPE_INT64"}


class _TwoHeads(nn.Module):
    """Two inputs (one integer), two outputs of different ranks: names, dtypes and dims all matter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 32)
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 16)

    def forward(self, x, ids):
        h = torch.relu(self.a(x + self.emb(ids).mean(1)))
        return self.b(h), h.view(h.shape[0], 4, 16).sum(-1)


def _masked() -> tuple[nn.Module, dict, tuple]:
    model = _TwoHeads().eval()
    masks = {"a.weight": synthetic.fanin_mask(model.a.weight, 0.9, 0.25), "b.weight": synthetic.nm_mask(model.b.weight)}
    return model, masks, (torch.randn(1, 32), torch.randint(0, 10, (1, 3)))


def _config(path: Path):
    return text_format.Parse(path.read_text(), PB2.ModelConfig())


def test_repository_config_parses_and_matches_the_onnx_graph(tmp_path):
    model, masks, inputs = _masked()
    written = sparsecc.export_triton(model, inputs, tmp_path / "repo", "mlp", masks=masks, max_batch_size=4,
                                     instances=2, threads=1)
    m = written.models["onnx"]
    assert m.directory == tmp_path / "repo" / "mlp" and m.version == 1 and m.file == m.directory / "1" / "model.onnx"
    config = _config(m.config)
    assert (config.name, config.platform, config.max_batch_size) == ("mlp", "onnxruntime_onnx", 4)
    graph = onnx.load(str(m.file)).graph
    for declared, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for t, v in zip(declared, values):
            dims = v.type.tensor_type.shape.dim
            assert not dims[0].HasField("dim_value")           # the batch dimension is dynamic in the file
            assert list(t.dims) == [d.dim_value if d.HasField("dim_value") else -1 for d in list(dims)[1:]]
            assert PB2.DataType.Name(t.data_type) == ONNX_TYPES[v.type.tensor_type.elem_type]
    assert [PB2.DataType.Name(t.data_type) for t in config.input] == ["TYPE_FP32", "TYPE_INT64"]
    assert [list(t.dims) for t in config.output] == [[16], [4]]
    assert config.HasField("dynamic_batching")
    assert [(g.count, PB2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(2, "KIND_CPU")]
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert m.max_abs_error.keys() == {1, 4}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_repository_onnx_runs_like_the_user_model_at_batch_1_and_max(tmp_path, precision):
    model, masks, inputs = _masked()
    hooked = synthetic.attach_with_prune(copy.deepcopy(model), masks)     # masks from prune hooks
    m = sparsecc.export_triton(hooked, inputs, tmp_path / "repo", "heads", max_batch_size=5,
                               precision=precision, threads=2).models["onnx"]
    config = _config(m.config)
    sess = session(m.file, int(config.parameters["intra_op_thread_count"].string_value))   # as Triton's backend
    dtype = np.float16 if precision == "fp16" else np.float32
    for batch in (1, config.max_batch_size):
        x, ids = torch.randn(batch, 32), torch.randint(0, 10, (batch, 3))
        got = sess.run(None, {config.input[0].name: x.numpy().astype(dtype), config.input[1].name: ids.numpy()})
        with torch.no_grad():
            expected = hooked(x, ids)              # the user's model as the user calls it
        for g, e in zip(got, expected):
            g = torch.from_numpy(g.astype(np.float32))
            assert g.shape == e.shape
            assert g.dtype == e.dtype
            tol = 2e-2 if precision == "fp16" else 1e-5
            torch.testing.assert_close(g, e, rtol=tol, atol=tol * float(e.abs().max()))


def test_a_half_precision_model_exports_in_its_own_dtype(tmp_path):
    """An fp16 model at the default precision (fp32: the model's own dtype kept): the repository's file takes and
    returns fp16 (every output: a sum over fp16 came back float32), and the export's check feeds it fp16 and compares
    at fp16's tolerance (it fed float32, and onnxruntime refused the input: "Unexpected input data type")."""
    model, masks, (x, ids) = _masked()
    hooked = synthetic.attach_with_prune(copy.deepcopy(model).half(), masks)     # cast, then prune: hooks live
    m = sparsecc.export_triton(hooked, (x.half(), ids), tmp_path / "repo", "heads", max_batch_size=4,
                               threads=1).models["onnx"]
    assert m.max_abs_error.keys() == {1, 4}
    config = _config(m.config)
    assert config.input[0].data_type == PB2.TYPE_FP16
    sess = session(m.file, 1)
    x4, ids4 = torch.randn(4, 32).half(), torch.randint(0, 10, (4, 3))
    got = sess.run(None, {config.input[0].name: x4.numpy(), config.input[1].name: ids4.numpy()})
    with torch.no_grad():
        expected = hooked(x4, ids4)                 # the user's model as the user calls it
    for g, e in zip(got, expected):      # output 1 is a sum over fp16, which torch.onnx alone returns as float32
        g = torch.from_numpy(g)
        assert g.shape == e.shape
        assert g.dtype == e.dtype == torch.float16
        torch.testing.assert_close(g, e, rtol=0, atol=1e-2 * float(e.abs().max()))


def test_re_export_adds_a_version_and_keeps_the_old_one(tmp_path):
    model, masks, inputs = _masked()
    first = sparsecc.export_triton(model, inputs, tmp_path, "m", masks=masks).models["onnx"]
    before = first.file.read_bytes()
    second = sparsecc.export_triton(model, inputs, tmp_path, "m", masks=masks, max_batch_size=2).models["onnx"]
    assert (first.version, second.version) == (1, 2)
    assert first.file.read_bytes() == before and second.file.is_file()
    assert _config(second.config).max_batch_size == 2                  # the config describes the latest export
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2", "config.pbtxt"]


def test_a_compiled_model_exports_too(tmp_path):
    model, masks, inputs = _masked()
    compiled = sparsecc.compile(model, inputs, masks=masks, backend="reference")
    m = sparsecc.export_triton(compiled, inputs, tmp_path, "c").models["onnx"]
    assert _config(m.config).name == "c" and m.max_abs_error[8] < 1e-4


def _nothing_written(path: Path, before: set) -> None:
    assert {p for p in path.rglob("*")} == before


def test_bad_arguments_write_nothing(tmp_path):
    model, masks, inputs = _masked()
    (tmp_path / "notes.txt").write_text("not a model")
    before = set(tmp_path.rglob("*"))
    cases = [(dict(repo_dir=tmp_path / "r", name="a/b"), ExportError, "model name 'a/b'"),
             (dict(repo_dir=tmp_path / "r", name=".."), ExportError, "model name '..'"),
             (dict(repo_dir=tmp_path, name="m"), ExportError, "is not a Triton model repository"),
             (dict(repo_dir=tmp_path / "notes.txt", name="m"), ExportError, "is a file"),
             (dict(repo_dir=tmp_path / "r", name="m", max_batch_size=0), InputError, "max_batch_size=0"),
             (dict(repo_dir=tmp_path / "r", name="m", formats=("pytorch",)), InputError, "formats=")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            sparsecc.export_triton(model, inputs, masks=masks, **kwargs)
    _nothing_written(tmp_path, before)


class _FixedBatch(nn.Module):
    """Views its input with the batch size baked in (2): it cannot take a dynamic batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x.view(2, -1, 8)).sum(1)


class _Flattens(nn.Module):
    """Folds the batch into one row: it exports, but its output has no batch dimension for Triton to split."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).reshape(1, -1)


@pytest.mark.parametrize("model,message", [(_FixedBatch, "free batch dimension"),
                                           (_Flattens, "needs the batch dimension first")])
def test_a_model_that_cannot_take_a_dynamic_batch_is_refused(tmp_path, model, message):
    with pytest.raises(ExportError, match=message):
        sparsecc.export_triton(model().eval(), torch.randn(2, 8), tmp_path / "r", "fixed")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(unavailable("tensorrt") is None, reason="this machine can build TensorRT engines")
def test_tensorrt_without_a_gpu_is_a_clear_error_and_writes_nothing(tmp_path):
    model, masks, inputs = _masked()
    with pytest.raises(RuntimeUnavailableError, match="formats includes 'tensorrt'"):
        sparsecc.export_triton(model, inputs, tmp_path / "r", "m", masks=masks, formats=("onnx", "tensorrt"))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_cli_writes_a_repository(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli.main(["export", "--triton", str(repo), "--model", "resnet18", "--image-size", "64",
                     "--max-batch-size", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {repo / 'resnet18' / '1' / 'model.onnx'}" in out and "tritonserver --model-repository" in out
    config = _config(repo / "resnet18" / "config.pbtxt")
    assert config.max_batch_size == 2 and list(config.input[0].dims) == [3, -1, -1]    # spatial size free: ResNet takes any
    assert list(config.output[0].dims) == [1000]
