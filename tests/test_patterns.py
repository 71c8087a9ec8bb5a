"""The pattern registry: a toy pattern (1:4 along K) added as one module plus its registration compiles,
validates, saves and exports; registration errors; the table's order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sparsecc
from sparsecc.core import patterns
from sparsecc.core.structures import ConstantFanIn
from sparsecc.planning.analysis import analyse
from sparsecc.runtimes import unavailable
from tests import toy_one_four as toy
from tests.conftest import assert_equivalent


def _model_and_masks() -> tuple[nn.Module, dict]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    return model, {"0.weight": toy.random_mask(48, 32, g), "2.weight": toy.random_mask(16, 48, g)}


def test_toy_pattern_compiles_validates_saves_and_exports(tmp_path):
    model, masks = _model_and_masks()
    x = torch.randn(3, 32)
    with patterns.registered(toy.PATTERN, before="2:4"):
        compiled = sparsecc.compile(model, x, masks=masks)
        layers = {lay.name: lay for lay in compiled.report.layers}
        assert [str(lay.structure) for lay in layers.values()] == ["1:4", "1:4"]
        assert all(lay.action == toy.OP.name and lay.runtime == "reference" for lay in layers.values())
        if unavailable("tvm") is None:      # auto picks TVM, which has no kernel for the toy op: the report says so
            assert "tvm has no one_four_linear kernel" in layers["0.weight"].reason
        assert compiled.report.validated
        expected_fn = sparsecc.masked_reference(model, masks)
        for batch in (x, torch.randn(5, 32)):
            with torch.no_grad():
                assert_equivalent(compiled(batch), expected_fn(batch))
        saved = sparsecc.save(compiled, tmp_path / "toy.pt2", x)
        assert_equivalent(sparsecc.load(saved)(x), expected_fn(x).detach())
        exported = sparsecc.export_onnx(compiled, x, tmp_path / "toy.onnx")
        import onnxruntime as ort

        session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
        y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert_equivalent(torch.from_numpy(np.asarray(y)), expected_fn(x).detach())
    # out of the table again: the same mask is plain constant fan-in (k = in/4)
    assert analyse("0.weight", masks["0.weight"]).structure == ConstantFanIn(8)


def test_toy_pattern_conformance_on_the_reference_runtime():
    with patterns.registered(toy.PATTERN, before="2:4"):
        op = patterns.op(toy.OP.name)
        for label, args, expected in op.samples(torch.Generator().manual_seed(1), torch.float64):
            assert_equivalent(op.function(*args, "reference"), expected)


def test_registration_errors_name_the_conflict():
    with patterns.registered(toy.PATTERN):
        with pytest.raises(ValueError, match="already registered"):
            patterns.register(toy.PATTERN)
        clash = patterns.Pattern("other", toy.OneFour, toy.detect, {}, (toy.OP,))
        with pytest.raises(ValueError, match="belong to another pattern"):
            patterns.register(clash)
    assert patterns.of(toy.OneFour()) is None and toy.OP.name not in patterns.ops()


def test_every_structure_maps_to_its_pattern():
    names = [p.name for p in patterns.PATTERNS]
    assert names == ["2:4", "channels", "fanin"]    # precedence: the more specific first
    for p in patterns.PATTERNS:
        assert set(p.rules) <= {"linear", "conv2d"}
        assert all(o.name in patterns.ops() for o in p.ops)
