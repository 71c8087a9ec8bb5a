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
from sparsecc.core.layers import CondensedLayer, exact_bf16
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
    """Fuzz seed 50076 (and 50074, 50110): the user's model is what sparsecc compares with; where it cannot run
    its own example (here a float16 cast after pruning left nn.MultiheadAttention's out_proj weight in float32:
    its prune hook never runs), the error says so instead of a RuntimeError from inside torch."""
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


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_regression_non_finite_inputs_reach_exactly_the_outputs_the_math_says_in_bf16(backend):
    """Fuzz seed 71005: narrowing made a bf16 Linear 38 wide (the user's is 40); torch's bf16 Linear reads on
    past the end of a row at that width, so a NaN in one token's input made NaN in the token before too, which
    the user's model (40 wide) does not. Calls with non-finite inputs compute bf16 GEMMs exactly
    (`exact_bf16`): NaN where the user's model has it, the rest within bf16 tolerance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8)).eval()
    mask = synthetic.fanin_mask(model[2].weight, 0.5)
    mask[:, [3, 5]] = False                                  # two channels of the first layer's output unused
    prune.custom_from_mask(model[2], "weight", mask)
    model = sparsecc.masked_reference(model).to(torch.bfloat16)
    x = torch.randn(4, 18, 24, dtype=torch.bfloat16)
    compiled = sparsecc.compile(model, (x,), backend=backend)
    assert next(m for m in compiled.module.modules() if isinstance(m, CondensedLayer)).weight_shape[1] == 38
    x[0, 12, 0] = float("nan")                               # one token's input
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isnan(want).any(-1).nonzero().tolist() == [[0, 12]]
    assert torch.equal(torch.isnan(got), torch.isnan(want)), torch.isnan(got).any(-1).nonzero().tolist()
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-2, atol=2e-2 * float(want[finite].abs().max()))
    outcome = run(case(71005), backend)
    assert outcome.status == "pass", outcome


def test_exact_bf16_is_where_nan_goes_and_the_same_values_elsewhere():
    """`exact_bf16` puts NaN where the math does (torch's bf16 Linear at some widths also puts it in the row
    before) and gives the values torch's bf16 ops give within bf16 rounding, under bf16 autocast too."""
    torch.manual_seed(0)
    x, w, b = torch.randn(72, 38).bfloat16(), torch.randn(8, 38).bfloat16(), torch.randn(8).bfloat16()
    image, kernel = torch.randn(1, 5, 12, 12).bfloat16(), torch.randn(16, 5, 3, 3).bfloat16()
    with exact_bf16():
        exact, conv = nn.functional.linear(x, w, b), nn.functional.conv2d(image, kernel, padding=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = nn.functional.linear(x.float(), w.float(), b.float())
    for got, want in ((exact, nn.functional.linear(x, w, b)), (autocast, nn.functional.linear(x, w, b)),
                      (conv, nn.functional.conv2d(image, kernel, padding=1))):
        assert got.shape == want.shape and got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    x[12, 0] = float("nan")
    image[0, 0, 5, 5] = float("inf")
    with exact_bf16():
        rows = torch.isnan(nn.functional.linear(x, w, b)).any(-1).nonzero().flatten().tolist()
        hit = torch.isnan(nn.functional.conv2d(image, kernel, padding=1))
    assert rows == [12]
    assert torch.equal(hit, torch.isnan(nn.functional.conv2d(image.float(), kernel.float(), padding=1)))


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
