"""A fixed sample of the differential fuzzer (`tests/fuzz`, `make fuzz` runs thousands): every seed on the
op runtimes, the other paths on their seeded share. A case passes or is refused with a `SparseccError`;
wrong numbers and any other exception fail. Then the minimised regressions of what the fuzzer found."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

import sparsecc
from sparsecc import EquivalenceError, InputError, dynamo, swat
from sparsecc.core.layers import CondensedLayer
from sparsecc.tooling import synthetic
from tests.conftest import assert_equivalent
from tests.fuzz import __main__ as fuzz_main
from tests.fuzz.generate import Residual, case
from tests.fuzz.run import BACKENDS, run, runs_on

SAMPLE = range(1000, 1036)
CASES = [(seed, backend) for seed in SAMPLE for backend in BACKENDS if runs_on(seed, backend)]


@pytest.mark.parametrize("seed,backend", CASES, ids=[f"{s}-{b}" for s, b in CASES])
def test_fuzz_sample(seed, backend):
    outcome = run(case(seed), backend)
    assert outcome.status in ("pass", "refused"), f"{case(seed)}: {outcome.detail}"


def test_sample_reaches_every_backend_and_family():
    assert {b for _, b in CASES} == set(BACKENDS)
    assert {case(s).family for s in SAMPLE} == {"mlp", "cnn", "attention", "shared"}
    assert {case(s).source for s in SAMPLE} >= {"masks=", "prune", "parametrize", "zeros", "swat"}
    assert {case(s).dtype for s in SAMPLE} == {torch.float32, torch.bfloat16, torch.float16}


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_regression_rows_in_any_order(backend):
    """Fuzz metamorphic check: the TVM runtime took an ablated layer's rows as sorted; the op contract says
    value row i is output row rows[i], whatever their order."""
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.75, ablate=0.25))
    x = torch.randn(5, 32)
    compiled = sparsecc.compile(model, (x,), backend=backend)
    layer = next(m for m in compiled.modules() if isinstance(m, CondensedLayer))
    perm = torch.randperm(layer.values.shape[0])
    layer.values, layer.indices, layer.rows = layer.values[perm], layer.indices[perm], layer.rows[perm]
    with torch.no_grad():
        for batch in (x[:1], x):
            assert_equivalent(compiled(batch), model(batch))


def test_regression_module_state_after_a_graph_break():
    """Fuzz seed 122: torch.ao's FakeSparsity makes dynamo break the graph inside a block; the resumed frame
    reaches the next BatchNorms' buffers through its stack, they were taken for inputs and redrawn at random
    for validation (negative variances: NaN)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), Residual(random.Random(0), 16), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for bn in (model[1].bn_a, model[1].bn_b):
            bn.running_var.uniform_(0.5, 1.5)
    for name, mask in synthetic.fanin_masks(model, 0.75).items():
        parametrize.register_parametrization(model.get_submodule(name.rpartition(".")[0]), "weight",
                                             FakeSparsity(mask))
    compiled = torch.compile(model, backend=dynamo.backend_with(inductor=False), dynamic=False)
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        assert_equivalent(compiled(x), model(x))
    torch._dynamo.reset()


def test_regression_fused_path_on_dense_weights_is_refused_with_the_reason():
    """Fuzz seed 155: SWAT top-K Linears inside nn.TransformerEncoder. Under no_grad torch's fused path
    reads their dense weights (no top-K), so the user's model is not what the modules compute one by one:
    compiling must refuse and say so rather than return either answer silently."""
    layer = nn.TransformerEncoderLayer(24, 2, 48, batch_first=True)
    model = swat.swatify(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), 0.5).eval()
    with pytest.raises(EquivalenceError, match="fused fast path"):
        sparsecc.compile(model, (torch.randn(2, 5, 24),), backend="reference")


def test_regression_a_model_that_fails_on_its_own_inputs_is_an_input_error():
    """Fuzz seed 50076 (and 50074, 50110): the user's model is what sparsecc compares with; where it cannot run its own example (here a float16
    cast after pruning left nn.MultiheadAttention's out_proj weight in float32: its prune hook never runs), the
    error says so instead of a RuntimeError from inside torch."""
    torch.manual_seed(0)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    user = Attend().eval()
    prune.custom_from_mask(user.attn.out_proj, "weight", synthetic.fanin_mask(user.attn.out_proj.weight, 0.5))
    user = user.to(torch.float16)
    x = torch.randn(2, 5, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError):          # the model as the user runs it
        user(x)
    with pytest.raises(InputError, match=r"your model itself fails on these inputs \(RuntimeError: .*dtype") as exc:
        sparsecc.compile(user, (x,))
    assert isinstance(exc.value.__cause__, RuntimeError)
    outcome = run(case(50076), "reference")          # the seed itself: refused with that reason, not a failure
    assert outcome.status == "refused" and outcome.detail.startswith("InputError: your model itself fails"), outcome


@pytest.mark.slow
def test_fuzz_command_prints_per_backend_counts():
    done = subprocess.run([sys.executable, "-m", "tests.fuzz", "--cases", "2", "--first", "1000", "--workers", "1",
                           "--backends", "reference,tvm"], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for backend in ("reference", "tvm"):
        row = next(line.split() for line in lines if line.startswith(backend))
        cases, passes, refusals, failures = map(int, row[1:])
        assert cases == 2 and passes + refusals == 2 and failures == 0
    assert lines[-1] == "4 passed, 0 failed"


def test_a_crashed_worker_names_its_unfinished_cases(tmp_path):
    journal = tmp_path / "journal"
    journal.write_text("11 5 reference\n11 5 tvm\n12 6 reference\n")
    assert fuzz_main._crashed(str(journal), {(5, "reference"), (6, "reference")}) == [(5, "tvm")]
