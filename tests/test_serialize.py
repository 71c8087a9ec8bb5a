"""`sparsecc.save` / `sparsecc.load`: .pt2 round trips through torch.export, loaded in a fresh process that
imports only torch and sparsecc; incompatible files are refused clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import serialize
from sparsecc.tooling import synthetic
from sparsecc.tooling.demo import build
from tests.conftest import assert_equivalent

_LOAD_AND_RUN = """
import sys, torch, sparsecc
model = sparsecc.load(sys.argv[1])
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save([model(x) for x in inputs], sys.argv[3])
"""


def _run_fresh(path, inputs, tmp_path):
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(path), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name,structure,shape", [
    ("resnet18", "fanin", (3, 64, 64)),
    ("vit_b_16", "2:4", (3, 64, 64)),
])
def test_round_trip_in_a_fresh_process(tmp_path, name, structure, shape):
    model = build(name, image_size=shape[-1])
    include = synthetic.all_but_stem if name == "resnet18" else synthetic.vit_encoder
    masks = synthetic.structured_masks(model, structure, 0.9, 0.1, include)
    compiled = sparsecc.compile(model, torch.randn(1, *shape), masks=masks)
    path = sparsecc.save(compiled, tmp_path / "model.pt2")
    inputs = [torch.randn(1, *shape), torch.randn(3, *shape)]
    outputs = _run_fresh(path, inputs, tmp_path)
    reference = sparsecc.masked_reference(model, masks)
    with torch.no_grad():
        for x, y in zip(inputs, outputs):
            assert_equivalent(y, reference(x))
            assert_equivalent(y, compiled(x))


def test_export_of_a_compiled_model_keeps_sparsecc_ops():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    compiled = sparsecc.compile(model, torch.randn(1, 32), masks=synthetic.fanin_masks(model, 0.75, 0.25))
    program = torch.export.export(compiled, (torch.randn(2, 32),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("sparsecc.condensed_linear.default") == 2
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert_equivalent(program.module()(x), compiled(x))


def test_save_without_example_inputs_uses_the_compiled_shapes(tmp_path):
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    masks = {"0.weight": synthetic.fanin_mask(model[0].weight, 0.5)}
    compiled = sparsecc.compile(model, torch.randn(1, 32), masks=masks)
    loaded = sparsecc.load(sparsecc.save(compiled, tmp_path / "m.pt2"))
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert_equivalent(loaded(x), sparsecc.masked_reference(model, masks)(x))


def test_file_from_another_format_is_refused(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    compiled = sparsecc.compile(model, torch.randn(1, 8), masks={"0.weight": synthetic.fanin_mask(model[0].weight,
                                                                                                    0.5)})
    monkeypatch.setattr(serialize, "FORMAT", 999)
    path = sparsecc.save(compiled, tmp_path / "future.pt2")
    monkeypatch.setattr(serialize, "FORMAT", 1)
    with pytest.raises(sparsecc.VersionError, match="file format 999; this is sparsecc .* \\(format 1\\)"):
        sparsecc.load(path)


def test_foreign_files_are_refused(tmp_path):
    plain = torch.export.export(nn.Linear(4, 2), (torch.randn(1, 4),))
    torch.export.save(plain, tmp_path / "plain.pt2")
    with pytest.raises(sparsecc.VersionError, match="not written by sparsecc.save"):
        sparsecc.load(tmp_path / "plain.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip file" * 4)
    with pytest.raises(sparsecc.VersionError, match="is not a torch.export file"):
        sparsecc.load(tmp_path / "junk.pt2")
    with pytest.raises(sparsecc.InputError, match="is not a file"):
        sparsecc.load(tmp_path / "missing.pt2")


def test_save_argument_errors(tmp_path):
    with pytest.raises(sparsecc.InputError, match="takes what sparsecc.compile returns"):
        sparsecc.save(nn.Linear(2, 2), tmp_path / "m.pt2")
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    compiled = sparsecc.compile(model, masks={"0.weight": synthetic.fanin_mask(model[0].weight, 0.5)})
    with pytest.raises(sparsecc.InputError, match="compiled without any and never called"):
        sparsecc.save(compiled, tmp_path / "m.pt2")
    with pytest.raises(sparsecc.InputError, match="does not exist"):
        sparsecc.save(compiled, tmp_path / "no" / "m.pt2", torch.randn(1, 8))
