"""Conformance: every registered pattern's op × every available op runtime × its sample shapes, against the dense
masked torch op and the reference runtime (the oracle), in every dtype the runtime declares; the op's fake
kernel against the real one; and every available engine running a small model of each pattern."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import runtimes
from sparsecc.core import patterns
from sparsecc.runtimes import get_runtime, unavailable
from tests.conftest import assert_equivalent

OPS = sorted(patterns.ops())
AVAILABLE = [name for name in runtimes.RUNTIMES if unavailable(name) is None]
ENGINES = [name for name in runtimes.ENGINES if unavailable(name) is None]
@pytest.mark.parametrize("runtime", AVAILABLE)
@pytest.mark.parametrize("op_name", OPS)
def test_op_on_runtime_matches_dense_and_reference(op_name, runtime):
    op = patterns.op(op_name)
    rt = get_runtime(runtime)
    if op_name not in rt.kernels:
        pytest.skip(f"{runtime} declares no kernel for {op_name}; compile falls back to another runtime")
    for dtype in sorted(rt.dtypes, key=str):
        for label, args, expected in op.samples(torch.Generator().manual_seed(0), dtype):
            got = op.function(*args, runtime)
            oracle = op.function(*args, "reference")
            assert_equivalent(got, expected)
            assert_equivalent(got, oracle)


@pytest.mark.parametrize("op_name", OPS)
def test_fake_kernel_agrees_with_the_real_one(op_name):
    op = patterns.op(op_name)
    for label, args, _ in op.samples(torch.Generator().manual_seed(1), torch.float32):
        torch.library.opcheck(getattr(torch.ops.sparsecc, op_name).default, (*args, "reference"),
                              test_utils=("test_schema", "test_faketensor"))


def _one_layer_model(pattern: patterns.Pattern) -> tuple[nn.Module, dict, torch.Tensor]:
    """A Linear (or Conv2d, for patterns without a Linear rule) with a mask taken from the pattern's own sample."""
    g = torch.Generator().manual_seed(2)
    op = pattern.ops[0] if pattern.ops else patterns.op("condensed_linear")
    label, args, _ = op.samples(g, torch.float32)[0]
    model = nn.Sequential(nn.Linear(args[0].shape[-1], 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    mask = patterns.fanin.random_mask(model[0].weight, 0.5, 0.25, g)
    if pattern.name == "2:4":
        mask = patterns.nm.random_mask(model[0].weight, g)
    return model, {"0.weight": mask}, torch.randn(2, args[0].shape[-1], generator=g)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("pattern", [p.name for p in patterns.PATTERNS if p.name != "channels"])
def test_engine_runs_each_pattern(engine, pattern):
    model, masks, x = _one_layer_model(next(p for p in patterns.PATTERNS if p.name == pattern))
    compiled = sparsecc.compile(model, x, masks=masks, backend=engine)
    assert compiled.report.engine == engine and compiled.report.validated
    with torch.no_grad():
        expected = sparsecc.masked_reference(model, masks)(x)
        assert_equivalent(compiled(x), expected)
