"""sparsecc.compile end to end on small models: every mask source, functional linears, attention, conv,
validation on first call, fallbacks, rewrite counts, and call-time errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

import sparsecc
from sparsecc import EquivalenceError, InputError, SparseccWarning
from sparsecc.core.patterns.fanin import CondensedLinear
from sparsecc.core.patterns.nm import NMLinear
from sparsecc.tooling.synthetic import fanin_mask, nm_mask
from tests.conftest import assert_equivalent


def mlp(d_in=32, hidden=48, d_out=10):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, d_out)).eval()


def check(model, compiled, *inputs):
    reference = sparsecc.masked_reference(model)
    with torch.no_grad():
        assert_equivalent(compiled(*inputs), reference(*inputs))
        assert_equivalent(compiled(*inputs), model(*inputs))


def test_mlp_pruned_with_prune_hooks():
    model = mlp()
    prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.75, ablate=0.25))
    prune.custom_from_mask(model[2], "weight", fanin_mask(model[2].weight, 0.9))
    x = torch.randn(2, 32)
    compiled = sparsecc.compile(model, (x,))
    assert compiled.report.rewrites == {"condensed_linear": 2}
    actions = {lay.name: lay.action for lay in compiled.report.layers}
    assert actions == {"0.weight": "condensed_linear", "2.weight": "condensed_linear", "4.weight": "kept"}
    assert compiled.report.validated and all(s.ok for s in compiled.report.end_to_end)
    check(model, compiled, torch.randn(5, 32))


def test_mlp_with_parametrization_mask():
    model = mlp()
    parametrize.register_parametrization(model[2], "weight", FakeSparsity(fanin_mask(model[2].weight, 0.8)))
    compiled = sparsecc.compile(model, (torch.randn(1, 32),))
    assert compiled.report.rewrites == {"condensed_linear": 1}
    check(model, compiled, torch.randn(3, 32))


def test_explicit_masks_and_dense_weights_freed():
    model = mlp()
    masks = {"2.weight": fanin_mask(model[2].weight, 0.9)}
    compiled = sparsecc.compile(model, (torch.randn(1, 32),), masks=masks)
    names = {n for n, _ in compiled.named_parameters()}
    assert "module.2.weight" not in names and "module.0.weight" in names
    layer = next(lay for lay in compiled.report.layers if lay.name == "2.weight")
    assert layer.bytes_condensed < layer.bytes_dense / 4
    check(sparsecc.masked_reference(model, masks), compiled, torch.randn(4, 32))


def test_two_four_linear():
    model = mlp()
    prune.custom_from_mask(model[2], "weight", nm_mask(model[2].weight))
    compiled = sparsecc.compile(model, (torch.randn(1, 32),))
    assert compiled.report.rewrites == {"nm_linear": 1}
    assert any(isinstance(m, NMLinear) for m in compiled.modules())
    check(model, compiled, torch.randn(6, 32))


def test_unstructured_and_dense_layers_are_kept_with_reasons():
    model = mlp()
    mask = fanin_mask(model[2].weight, 0.5)
    mask[3, :] = True       # one row with a larger fan-in
    prune.custom_from_mask(model[2], "weight", mask)
    compiled = sparsecc.compile(model, (torch.randn(1, 32),))
    assert compiled.report.rewrites == {}
    by_name = {lay.name: lay for lay in compiled.report.layers}
    assert by_name["2.weight"].action == "kept"
    assert by_name["2.weight"].reason.startswith("row 3 has fan-in 48, the others 24")
    assert by_name["0.weight"].reason == "no zeros in the mask"
    check(model, compiled, torch.randn(2, 32))


class FunctionalNet(nn.Module):
    """A linear that is not an nn.Linear: F.linear on a parameter of a custom module, constant fan-in 4."""

    def __init__(self):
        super().__init__()
        w = torch.randn(24, 16)
        self.w = nn.Parameter(w * fanin_mask(w, 0.75))
        self.b = nn.Parameter(torch.randn(24))

    def forward(self, x):
        return F.linear(x, self.w, self.b).relu()


def test_parameters_of_custom_modules_are_not_analysed():
    """Only nn.Linear / nn.Conv2d / attention weights are analysed, even when a custom one is sparse."""
    model = FunctionalNet().eval()
    compiled = sparsecc.compile(model, (torch.randn(1, 16),))
    assert compiled.report.layers == [] and compiled.report.rewrites == {}
    check(model, compiled, torch.randn(3, 16))


def test_root_linear_is_condensed_through_the_functional_rule():
    """Tracing a bare nn.Linear yields F.linear on its weight, which the functional rule condenses."""
    lin = nn.Linear(16, 24).eval()
    prune.custom_from_mask(lin, "weight", fanin_mask(lin.weight, 0.75))
    compiled = sparsecc.compile(lin, (torch.randn(1, 16),))
    assert compiled.report.rewrites == {"condensed_linear": 1}
    check(lin, compiled, torch.randn(3, 16))


class Attention(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x, padding=None):
        y, w = self.attn(x, x, x, key_padding_mask=padding, need_weights=padding is not None)
        return (y, w) if padding is not None else y


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_in_proj_is_condensed(batch_first):
    model = Attention(batch_first).eval()
    prune.custom_from_mask(model.attn, "in_proj_weight", fanin_mask(model.attn.in_proj_weight, 0.75, 0.1))
    prune.custom_from_mask(model.attn.out_proj, "weight", fanin_mask(model.attn.out_proj.weight, 0.5))
    x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    compiled = sparsecc.compile(model, (x,))
    assert compiled.report.rewrites == {"condensed_linear": 2}
    assert {lay.name for lay in compiled.report.condensed} == {"attn.in_proj_weight", "attn.out_proj.weight"}
    assert "module.attn.in_proj_weight" not in dict(compiled.named_parameters())
    check(model, compiled, x)


def test_attention_with_padding_mask_and_weights():
    model = Attention(True).eval()
    prune.custom_from_mask(model.attn, "in_proj_weight", fanin_mask(model.attn.in_proj_weight, 0.75))
    x = torch.randn(2, 5, 32)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    reference = sparsecc.masked_reference(model)
    compiled = sparsecc.compile(model, (x, padding))
    with torch.no_grad():
        (y, w), (ry, rw) = compiled(x, padding), reference(x, padding)
    assert_equivalent(y, ry)
    assert_equivalent(w, rw)


def test_no_example_inputs_validates_on_first_call(monkeypatch):
    model = mlp()
    prune.custom_from_mask(model[2], "weight", fanin_mask(model[2].weight, 0.9))
    compiled = sparsecc.compile(model)
    assert not compiled.report.validated
    assert "validation runs on the first call" in str(compiled.report)
    check(model, compiled, torch.randn(3, 32))
    assert compiled.report.validated and compiled.report.end_to_end[0].ok


@pytest.fixture
def break_kernel():
    """Call it to put the reference runtime's fan-in Linear kernel 1% off, through the pattern table the runtimes
    read; the original pattern is back after the test."""
    from sparsecc.core import patterns
    from sparsecc.core.patterns import fanin

    op = dataclasses.replace(fanin.LINEAR, reference=lambda *a: fanin.linear_reference(*a) * 1.01)

    def swap(pattern):
        patterns.unregister("fanin")
        patterns.register(pattern)      # fan-in is last in the table: registering appends it there again

    yield lambda: swap(dataclasses.replace(fanin.PATTERN, ops=(op, fanin.CONV2D)))
    swap(fanin.PATTERN)


def test_mismatch_raises_equivalence_error_naming_the_layer(break_kernel):
    model = mlp()
    prune.custom_from_mask(model[2], "weight", fanin_mask(model[2].weight, 0.9))
    break_kernel()
    with pytest.raises(EquivalenceError, match=r"worst layer 2\.weight: 2\.weight: max abs .* FAILED"):
        sparsecc.compile(model, (torch.randn(2, 32),), backend="reference")


def test_mismatch_on_first_call_raises(break_kernel):
    model = mlp()
    prune.custom_from_mask(model[2], "weight", fanin_mask(model[2].weight, 0.9))
    compiled = sparsecc.compile(model, backend="reference")
    break_kernel()
    with pytest.raises(EquivalenceError, match="worst layer 2.weight") as raised:
        compiled(torch.randn(2, 32))
    report = raised.value.report
    assert report.stages[-1].stage == "first call" and not report.end_to_end[0].ok
    assert not next(lay for lay in report.layers if lay.name == "2.weight").error.ok
    with pytest.raises(EquivalenceError, match="worst layer 2.weight"):     # not validated yet: checked again
        compiled(torch.randn(2, 32))


def test_validate_on_demand_reports_without_raising(break_kernel):
    model = mlp()
    prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.9))
    compiled = sparsecc.compile(model, (torch.randn(1, 32),), backend="reference")
    x = torch.randn(3, 32)
    assert sparsecc.validate(model, compiled, (x,)).ok
    break_kernel()
    result = sparsecc.validate(model, compiled, (x,))
    assert not result.ok
    assert result.worst_layer()[0] == "0.weight"


def test_wrong_input_dtype_and_shape_at_call_time():
    model = mlp()
    prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.9))
    compiled = sparsecc.compile(model, (torch.randn(1, 32),))
    with pytest.raises(InputError, match=r"input 0: got torch.float64 of shape \(N, 32\); compiled for "
                                         r"torch.float32 of shape \(N, 32\)"):
        compiled(torch.randn(1, 32, dtype=torch.float64))
    with pytest.raises(InputError, match=r"got torch.float32 of shape \(N, 31\)"):
        compiled(torch.randn(1, 31))
    with pytest.raises(InputError, match=r"called with 2 positional input.*takes at most 1 \(input\)"):
        compiled(torch.randn(1, 32), torch.randn(1, 32))


def test_example_the_model_itself_rejects_is_a_clear_error():
    """An example of the wrong width fails in the user's own first layer; compile says so (narrowing, the first
    stage to run the model, would otherwise surface fx's ShapeProp trace), and the hint is about shapes, not
    the prune-then-cast dtype trap."""
    with pytest.raises(InputError, match=r"your model itself fails on these inputs \(RuntimeError: mat1 and mat2 "
                                         r"shapes.*Check the example inputs' shapes") as exc:
        sparsecc.compile(_pruned_mlp(), (torch.randn(3, 31),))
    assert "prune.remove" not in str(exc.value)


def test_condensed_layer_names_itself_on_bad_input():
    layer = next(m for m in sparsecc.compile(_pruned_mlp(), (torch.randn(1, 32),)).modules()
                 if isinstance(m, CondensedLinear))
    with pytest.raises(InputError, match=r"^0: input shape \(2, 7\) does not fit weight \(48, 32\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(InputError, match=r"^0: input dtype torch.float16 but the layer was compiled for"):
        layer(torch.randn(2, 32, dtype=torch.float16))


def _pruned_mlp():
    model = mlp()
    prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.9))
    return model


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h.relu()
        return self.b(h)


def test_untraceable_model_falls_back_to_module_swapping():
    model = Untraceable().eval()
    prune.custom_from_mask(model.a, "weight", fanin_mask(model.a.weight, 0.75))
    compiled = sparsecc.compile(model, (torch.randn(1, 16),))
    report = compiled.report
    assert report.capture == "module swapping"
    assert "TraceError" in report.capture_reason
    assert report.rewrites == {"condensed_linear": 1}
    assert "capture module swapping (TraceError" in str(report)
    check(model, compiled, torch.randn(4, 16))


def test_train_mode_model_is_compiled_in_eval_and_noted():
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.75))
    with pytest.warns(SparseccWarning, match="train mode"):
        compiled = sparsecc.compile(model, (torch.randn(1, 16),))
    assert "model was in train mode: compiled an eval() copy" in str(compiled.report)
    assert model.training
    check(model.eval(), compiled, torch.randn(3, 16))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding="valid", groups=4)
        self.dw = nn.Conv2d(16, 16, 3, padding="same", groups=16)
        self.c3 = nn.Conv2d(16, 8, 1, padding_mode="zeros")
        self.c4 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.c4(self.c3(self.dw(self.c2(self.c1(x).relu())).relu()))


def test_convolutions():
    model = ConvNet().eval()
    for name in ("c1", "c2", "dw", "c3", "c4"):
        conv = getattr(model, name)
        prune.custom_from_mask(conv, "weight", fanin_mask(conv.weight, 0.6, ablate=0.2))
    x = torch.randn(1, 3, 15, 15)
    compiled = sparsecc.compile(model, (x,))
    assert compiled.report.rewrites == {"condensed_conv2d": 4}
    c4 = next(lay for lay in compiled.report.layers if lay.name == "c4.weight")
    assert c4.action == "kept" and c4.reason == "padding_mode='reflect'; sparsecc's convolutions pad with zeros only"
    check(model, compiled, torch.randn(2, 3, 15, 15))


def test_two_four_conv_runs_as_fanin():
    conv = nn.Conv2d(8, 4, 3, padding=1).eval()
    prune.custom_from_mask(conv, "weight", nm_mask(conv.weight))
    compiled = sparsecc.compile(conv, (torch.randn(1, 8, 6, 6),))
    assert compiled.report.layers[0].structure == "2:4"
    assert compiled.report.rewrites == {"condensed_conv2d": 1}
    check(conv, compiled, torch.randn(1, 8, 6, 6))


def test_inspect_reports_flops_per_call_with_inputs():
    model = mlp()
    prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.75))
    per_position = sparsecc.inspect(model)
    layer = per_position.layers[0]
    assert (layer.macs_dense, layer.macs_sparse) == (48 * 32, 48 * 8)
    assert "/position" in per_position.table()
    assert per_position.summary().startswith("1/3 layers condensable; weights")
    per_call = sparsecc.inspect(model, (torch.randn(5, 32),))
    assert per_call.layers[0].total_macs == (5 * 48 * 32, 5 * 48 * 8)
    assert per_call.layers[0].bytes_dense == (48 * 32 + 48) * 4
    assert per_call.layers[0].bytes_condensed == 48 * 8 * (4 + 2) + 48 * 4


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, q, kv):
        return self.attn(q, kv, kv, need_weights=False)[0]


def test_cross_attention_keeps_sliced_in_proj_dense_and_stays_exact():
    model = CrossAttention().eval()
    prune.custom_from_mask(model.attn, "in_proj_weight", fanin_mask(model.attn.in_proj_weight, 0.75))
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    compiled = sparsecc.compile(model, (q, kv))
    layer = next(lay for lay in compiled.report.layers if lay.name == "attn.in_proj_weight")
    assert layer.action == "kept" and "condensable but not rewritten" in layer.reason
    check(model, compiled, torch.randn(1, 3, 16), torch.randn(1, 5, 16))


def test_optional_forward_arguments_are_fixed_to_their_defaults():
    model = Attention(True).eval()
    prune.custom_from_mask(model.attn, "in_proj_weight", fanin_mask(model.attn.in_proj_weight, 0.75))
    compiled = sparsecc.compile(model, (torch.randn(2, 5, 32),))
    assert compiled.report.capture == "torch.fx"
    check(model, compiled, torch.randn(3, 5, 32))


def test_compiled_model_survives_deepcopy_after_use():
    import copy

    model = _pruned_mlp()
    compiled = sparsecc.compile(model, (torch.randn(2, 32),))
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = compiled(x)
        assert_equivalent(copy.deepcopy(compiled)(x), expected)


def test_missing_runtime_is_a_clear_error_and_auto_falls_back(monkeypatch):
    from sparsecc import RuntimeUnavailableError, runtimes

    monkeypatch.setitem(runtimes.RUNTIMES, "tvm", "sparsecc.runtimes.not_installed")
    runtimes.get_runtime.cache_clear()
    try:
        with pytest.raises(RuntimeUnavailableError, match="runtime 'tvm' cannot be imported: No module named"):
            sparsecc.compile(_pruned_mlp(), (torch.randn(1, 32),), backend="tvm")
        compiled = sparsecc.compile(_pruned_mlp(), (torch.randn(1, 32),))
        assert compiled.report.runtime == "reference"
    finally:
        runtimes.get_runtime.cache_clear()
