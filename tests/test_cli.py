"""The command line: demo and inspect print what they promise; errors exit 2 with a message."""

import subprocess
import sys


from sparsecc import cli


def test_demo_prints_table_and_latency_line(capsys):
    assert cli.main(["demo", "--model", "resnet18", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1.weight" in out and "condensed_conv2d" in out
    assert "end to end vs masked reference: output 0: max abs" in out
    assert "batch-1 latency, 1 thread(s), median of 2: dense torch eager" in out


def test_inspect_prints_structures(capsys):
    assert cli.main(["inspect", "--model", "resnet18", "--sparsity", "0.8", "--ablate", "0"]) == 0
    out = capsys.readouterr().out
    assert "fan-in k=115" in out      # layer1 convs: 64*3*3 = 576 fan-in, 20% kept
    assert "/position" not in out      # inspect runs an example input, so MACs are per call


def test_unknown_backend_is_a_clean_error(capsys):
    assert cli.main(["demo", "--model", "resnet18", "--backend", "nope", "--runs", "1"]) == 2
    assert "unknown runtime 'nope'" in capsys.readouterr().err


def test_runtimes_smoke_module():
    out = subprocess.run([sys.executable, "-m", "sparsecc.runtimes"], capture_output=True, text=True, check=True)
    assert "PASS reference" in out.stdout
