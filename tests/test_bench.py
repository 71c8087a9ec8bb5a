"""The benchmark harness runs end to end on a small layer: every method agrees with the masked layer, the
table and plot are written. (Timings themselves are the benchmark's job, never asserted here.)"""

import pytest
import torch

import sparsecc
from sparsecc.core.compare import TOLERANCE
from sparsecc.runtimes import cpu
from sparsecc.tooling import bench, synthetic

pytestmark = pytest.mark.slow    # whole models: `make test` runs it, `make check` does not


def test_layer_methods_all_valid_and_tables_render(tmp_path):
    weight, b = torch.randn(48, 128) * 0.1, torch.randn(48) * 0.1
    progress = bench.Progress(2)
    rows = [bench.bench_layer("90% fan-in", weight, b, synthetic.fanin_mask(weight, 0.9), 3, progress),
            bench.bench_layer("50% 2:4", weight, b, synthetic.nm_mask(weight), 3, progress)]
    expected = {"dense eager", "dense torch.compile", "torch CSR", "SRigL method (torch.compile)",
                "onnxruntime dense (fp32)", "onnxruntime condensed (fp32)", "sparsecc reference", "sparsecc tvm"}
    for row in rows:
        assert row.invalid == {}
        assert set(row.times) == expected
        assert all(t > 0 for t in row.times.values())
    table = bench.layer_table(rows)
    assert table.count("\n") == 3 and "| 90% fan-in |" in table and "sparsecc tvm" in table
    bench.plot(rows, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensor_bytes_counts_shared_storage_once():
    lin = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(lin, lin)
    assert bench.tensor_bytes(model) == (4 * 3 + 3) * 4


def test_onnx_formulation_table_validates_every_form(monkeypatch):
    monkeypatch.setattr(bench, "FORMULATION_CASES", (
        ("Linear 64→32, 5 tokens", lambda: torch.nn.Linear(64, 32), (1, 5, 64)),
        ("Conv 3x3 8→8, 6x6", lambda: torch.nn.Conv2d(8, 8, 3, padding=1), (1, 8, 6, 6))))
    table = bench.formulation_table(runs=1).splitlines()
    assert len(table) == 2 + 2 * 4
    linear_rows = [line for line in table if line.startswith("| Linear")]
    conv_rows = [line for line in table if line.startswith("| Conv")]
    assert all(line.count("µs") == 3 for line in linear_rows)      # dense, rows, gather
    assert all(line.count("µs") == 2 and line.endswith("| - |") for line in conv_rows)


def _small_cnn():
    """A stand-in for the built-in torchvision models: a 224x224 image in, logits out, 90% fan-in masks."""
    import torch.nn.utils.prune as prune
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    for layer in (model[2], model[6]):
        prune.custom_from_mask(layer, "weight", synthetic.fanin_mask(layer.weight, 0.75))
    return model


def test_peers_agree_with_the_model_and_name_their_precision(tmp_path):
    from sparsecc.tooling import peers

    model = _small_cnn()
    x = torch.randn(1, 3, 224, 224)
    expected = sparsecc.masked_reference(model)(x)
    found = peers.peers(model, (x,), tmp_path, threads=1)
    assert [p.name for p in found] == ["onnxruntime dense", "onnxruntime condensed", "OpenVINO f32",
                                       "OpenVINO default"]
    assert peers.openvino_unavailable() is None         # `make test` installs the peers extra
    for peer in found:
        assert peer.fn is not None, peer.unavailable
        out = peer.fn(x)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        tol = peers.tolerance(peer.precision) or 1e-4
        scale = float(expected.abs().max())
        torch.testing.assert_close(out, expected, rtol=0, atol=tol * scale)
    assert [p.precision for p in found[:3]] == ["fp32", "fp32", "fp32"]
    isa = cpu.isa()
    assert found[3].precision == ("bf16" if "avx512_bf16" in isa or "amx_bf16" in isa else "fp32")


def test_peers_of_a_half_precision_model_run_in_its_dtype(tmp_path):
    """An fp16 model's ONNX file is fp16: onnxruntime's rows say so, take fp16 inputs (the free-axes probe too:
    no "only the batch axis is free" warning) and agree with the model; the condensed file on onnxruntime is
    validated at fp16's tolerance, not fp32's."""
    import warnings

    from sparsecc.tooling import peers

    model = _small_cnn().half()         # prune hooks live: the model as the user runs it
    x = torch.randn(1, 3, 224, 224).half()
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsecc.SparseccWarning)
        found = peers.peers(model, (x,), tmp_path, threads=1, openvino=False)
    assert [(p.name, p.precision) for p in found] == [("onnxruntime dense", "fp16"), ("onnxruntime condensed", "fp16")]
    for peer in found:
        assert peer.fn is not None, peer.unavailable
        with torch.no_grad():
            out = peer.fn(x)
        assert out.shape == expected.shape and out.dtype == expected.dtype == torch.float16
        scale = float(expected.abs().max())
        torch.testing.assert_close(out, expected, rtol=0, atol=peers.tolerance(peer.precision) * scale)
    stats = [st for st in found[1].fn.report.end_to_end if st.max_abs > 0]
    assert stats and all(st.ok for st in stats), stats
    relative = [st.tolerance * st.max_rel / st.max_abs for st in stats]      # tolerance over max |reference|
    assert relative == pytest.approx([TOLERANCE[torch.float16]] * len(stats), rel=1e-3), stats


def test_model_rows_with_peers_render(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("sparsecc.tooling.demo.sparse_model", lambda *a, **k: _small_cnn())
    progress = bench.Progress(1)
    row = bench.bench_model("small", 2, progress, memory=False, threads=1, openvino=True)
    assert "sparsecc" not in row.invalid and row.times["sparsecc"] > 0
    labels = {"onnxruntime dense (fp32)", "onnxruntime condensed (fp32)", "OpenVINO f32 (fp32)", "sparsecc (bf16)",
              "sparsecc fused (bf16)"}
    assert labels <= set(row.times)
    assert any(m.startswith("OpenVINO default (") for m in row.times)
    table = bench.peer_table([row])
    assert "OpenVINO default (" in table and "| small, 90% fan-in | 1 |" in table
    assert row.tiles and sum(row.tiles.values()) <= row.condensed          # the conv's tile, by measurement
    assert "OpenVINO f32 (fp32)" in bench.model_table([row]) and next(iter(row.tiles)) in bench.model_table([row])


def test_results_name_the_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "SPARSITIES", (0.9,))
    text = bench.run(tmp_path, runs=2, model_runs=1, models=(), memory=False, threads=(1,), structures=())
    assert text.startswith(f"CPU: {cpu.model()} (") and cpu.isa()[0] in text.splitlines()[0]
    assert (tmp_path / "results.md").read_text() == text


def test_token_layer_table_renders_with_tiles(monkeypatch):
    from torch import nn

    monkeypatch.setattr(bench, "TOKEN_LAYERS", (
        ("Linear 64→48, 20 tokens", lambda: nn.Linear(64, 48), (1, 20, 64), 0.75),
        ("Conv 3x3 8→8, 6x6", lambda: nn.Conv2d(8, 8, 3, padding=1), (1, 8, 6, 6), 0.75)))
    lines = bench.token_layer_table(runs=1, threads=(1,)).splitlines()
    assert lines[0].startswith("CPU: ") and len(lines) == 4 + 2
    assert all(line.count(" µs") == 2 and line.endswith(" |") and "| - |" not in line for line in lines[4:])
