"""The command line: demo and inspect print what they promise; errors exit 2 with a message."""

import json
import subprocess
import sys

import pytest

from sparsecc.tooling import cli


@pytest.mark.slow
def test_demo_prints_table_and_latency_line(capsys):
    assert cli.main(["demo", "--model", "resnet18", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1.weight" in out and "condensed_conv2d" in out
    assert "end to end vs your model: output 0: max abs" in out
    assert "batch-1 latency, median of 2 interleaved rounds:" in out
    from sparsecc.core.timing import THREADS

    for n in THREADS:
        assert f"  {n} thread(s): dense torch eager " in out


@pytest.mark.slow
def test_inspect_prints_structures(capsys):
    assert cli.main(["inspect", "--model", "resnet18", "--sparsity", "0.8", "--ablate", "0"]) == 0
    out = capsys.readouterr().out
    assert "fan-in k=115" in out      # layer1 convs: 64*3*3 = 576 fan-in, 20% kept
    assert "/position" not in out      # inspect runs an example input, so MACs are per call


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [False, True])
def test_demo_at_bf16_precision(capsys, fuse):
    args = ["demo", "--model", "resnet18", "--runs", "2", "--threads", "1", "--precision", "bf16"]
    assert cli.main(args + (["--fuse"] if fuse else [])) == 0
    out = capsys.readouterr().out
    assert "run in bf16" in out and "precision bf16: the " in out and "6e-02 x max |output|" in out
    assert "end to end vs your model: output 0: max abs" in out
    assert ("fuse at 1 thread(s): " in out and " ms fused (" in out and ", fused" in out) == fuse, out


def test_unknown_backend_is_a_clean_error(capsys):
    assert cli.main(["demo", "--model", "resnet18", "--backend", "nope", "--runs", "1"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_runtimes_smoke_command():
    out = subprocess.run([sys.executable, "-m", "sparsecc.tooling.cli", "smoke"], capture_output=True, text=True,
                         check=True)
    assert "PASS reference" in out.stdout and "PASS tvm" in out.stdout and "PASS onnxruntime" in out.stdout
    assert "tensorrt" in out.stdout


@pytest.mark.slow
def test_export_then_check_2to4(tmp_path, capsys):
    out = tmp_path / "r18.onnx"
    assert cli.main(["export", str(out), "--model", "resnet18", "--structure", "2:4", "--mode", "dense"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and out.is_file()
    assert cli.main(["check-2to4", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "19 of 21 weights are 2:4 where TensorRT reads them"   # all convs but the stem; not fc
    assert any("layer4.1.conv2.weight 512x512x3x3 axis 1: 50% zeros, 2:4" in line for line in lines)


def test_check_2to4_missing_file_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["check-2to4", str(tmp_path / "none.onnx")]) == 2
    assert "is not a file" in capsys.readouterr().err


@pytest.mark.slow
def test_export_tvm_library_then_run_it_with_the_runner(tmp_path, capsys):
    out = tmp_path / "r18.so"
    assert cli.main(["export", str(out), "--model", "resnet18", "--image-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "'condensed_conv2d/spmm_flat': 16" in printed and out.is_file()
    from sparsecc.runtimes.tvm import runner as tvm_runner

    done = subprocess.run([sys.executable, tvm_runner.__file__, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads(done.stdout[:done.stdout.rindex("}") + 1])
    assert meta["inputs"] == [[[1, 3, 64, 64], "float32"]] and meta["outputs"] == [[1, 1000]]
    assert "output (1, 1000) float32 finite" in done.stdout


def test_export_image_size_must_fit_the_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", str(tmp_path / "v.so"), "--model", "vit_b_16", "--image-size", "72"])
    assert exc.value.code == 2
    assert "--image-size 72: use at least 32, and a multiple of 16 for vit_b_16" in capsys.readouterr().err
    assert not (tmp_path / "v.so").exists()
