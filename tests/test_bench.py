"""The benchmark harness runs end to end on a small layer: every method agrees with the masked layer, the
table and plot are written. (Timings themselves are the benchmark's job, never asserted here.)"""

import torch

from sparsecc import bench, synthetic


def test_layer_methods_all_valid_and_tables_render(tmp_path):
    weight, b = torch.randn(48, 128) * 0.1, torch.randn(48) * 0.1
    progress = bench.Progress(2)
    rows = [bench.bench_layer("90% fan-in", weight, b, synthetic.fanin_mask(weight, 0.9), 3, progress),
            bench.bench_layer("50% 2:4", weight, b, synthetic.nm_mask(weight), 3, progress)]
    expected = {"dense eager", "dense torch.compile", "torch CSR", "SRigL method (torch.compile)",
                "onnxruntime dense", "onnxruntime condensed", "sparsecc reference", "sparsecc tvm"}
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
