"""``compile(..., fuse=...)``: inductor fuses the dense remainder of the graph for the example call.

What the fused graph computes is checked against the user's model (and the masked dense model) on the calls it
serves, and each call it must not serve (another shape, strides, thread count, grad on, non-finite inputs)
is checked to run the eager graph. Whether it is kept is a measurement; most tests here set the margin so that
any fused graph is kept (or none is) and check the rest, one test leaves the measurement alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import InputError
from sparsecc.compiler import fuse as _fuse, pipeline, precision
from sparsecc.core.layers import CondensedLayer
from sparsecc.runtimes import tuning
from sparsecc.tooling import synthetic
from tests.conftest import assert_equivalent, pruned, small_cnn


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10)).eval()
    synthetic.attach_with_prune(model, synthetic.structured_masks(model, "fanin", 0.75))
    return model


class TwoInputs(nn.Module):
    """Called with keywords in any order: the fused graph takes its inputs in the graph's order."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 48), nn.Linear(16, 48)

    def forward(self, left, right):
        return torch.relu(self.a(left)) * torch.sigmoid(self.b(right))


class TupleAndDefaults(nn.Module):
    """Answers a tuple (inductor answers a list) and has parameters the example leaves at their defaults (the
    fused graph bakes them in: timm's ViT has ``attn_mask=None``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x, mask=None, scale: float = 2.0):
        h = torch.relu(self.a(x))
        if mask is not None:
            h = h * mask
        return self.b(h) * scale, h.sum(-1)


@pytest.fixture
def keep_any(monkeypatch):
    """Keep any fused graph that validates (these tests check what it computes, not its speed)."""
    monkeypatch.setattr(_fuse, "FUSE_MARGIN", -1.0)


@pytest.fixture
def dense_choices(monkeypatch):
    """Every layer runs dense by choice (as a layer losing to AMX does): the fused graph gets torch's op."""
    monkeypatch.setattr(tuning, "choose", lambda cache, signature, tokens, sparse, dense, cold=False, tile="",
                        dense_form="", l2_cold=False: tuning.Choice(True, 2.0, 1.0, tokens, torch.get_num_threads(),
                                                                    cold, tile, dense_form, l2_cold))


def _entries(compiled) -> list[_fuse.Fused]:
    return list(compiled.__dict__["_fused"].values())


def _fuse_notes(compiled) -> list[str]:
    return [n for n in compiled.report.notes if n.startswith("fuse at")]


def _check(actual: torch.Tensor, expected: torch.Tensor, dtype_precision: str) -> None:
    if dtype_precision == "fp32":
        assert_equivalent(actual, expected)
        return
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0.0,
                               atol=precision.TOLERANCE * float(expected.abs().max()))


@pytest.mark.measured_choice
@pytest.mark.parametrize("build,shape", [(_mlp, (6, 64)), (small_cnn, (2, 3, 12, 12))])
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_fused_graph_of_dense_by_choice_layers_equals_the_users_model(build, shape, prec, keep_any,
                                                                      dense_choices):
    model = build()
    x = torch.randn(*shape)
    compiled = sparsecc.compile(model, (x,), precision=prec, fuse=True)
    [note] = _fuse_notes(compiled)
    assert "kept for calls like the example" in note and "validated: output 0" in note, note
    [entry] = _entries(compiled)
    layers = sum(isinstance(m, CondensedLayer) for m in compiled.modules())
    assert (entry.dense, entry.sparse) == (layers, 0) and layers >= 2
    served = entry.calls
    with torch.no_grad():
        for inputs in (x, torch.randn(*shape)):
            out = compiled(inputs)
            _check(out, model(inputs), prec)
            _check(out, sparsecc.masked_reference(model)(inputs), prec)
    assert entry.calls == served + 2


@pytest.mark.parametrize("build,shape", [(_mlp, (5, 64)), (small_cnn, (2, 3, 12, 12))])
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_fused_graph_runs_sparse_kernels_eagerly(build, shape, prec, keep_any):
    """Each sparse layer is an opaque call inside the fused graph that runs the layer as the eager graph does;
    its output's strides are the eager run's (a condensed convolution answers channels-last at
    ``precision="bf16"``), or inductor's stride check fails."""
    model = build()
    x = torch.randn(*shape)
    compiled = sparsecc.compile(model, (x,), precision=prec, fuse=True)     # conftest pins the sparse kernels
    [note] = _fuse_notes(compiled)
    assert "kept for calls like the example" in note, note
    [entry] = _entries(compiled)
    layers = sum(isinstance(m, CondensedLayer) for m in compiled.modules())
    assert entry.dense == 0 and entry.sparse == layers == len(entry.eager.handles) + entry.eager.chains  # a chain: 1
    with torch.no_grad():
        _check(compiled(x), model(x), prec)
    assert entry.calls >= 1


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def test_a_chain_stays_a_chain_in_the_fused_graph(keep_any, monkeypatch):
    """fc1 -> GELU -> fc2 runs as one eager call in the fused graph, its intermediate in the runtime's layout
    (as the layers' custom ops, inductor would cut the chain); the registered calls go with the fused graph."""
    from sparsecc.runtimes.tvm.runtime import BoundLinear

    torch.manual_seed(0)
    model = pruned(Mlp())
    x = torch.randn(1, 40, 64)
    compiled = sparsecc.compile(model, (x,), fuse=True)     # conftest pins the sparse kernels
    [note] = _fuse_notes(compiled)
    assert "kept for calls like the example" in note and "(1 chain(s) of two)" in note, note
    [entry] = _entries(compiled)
    assert entry.eager.chains == 1
    chained = []
    real = BoundLinear.chain
    monkeypatch.setattr(BoundLinear, "chain", lambda self, *a, **k: chained.append(1) or real(self, *a, **k))
    served = entry.calls
    with torch.no_grad():
        for inputs in (x, torch.randn(1, 40, 64)):
            out = compiled(inputs)
            assert_equivalent(out, model(inputs))
            assert_equivalent(out, sparsecc.masked_reference(model)(inputs))
    assert entry.calls == served + 2 and len(chained) == 2
    handles = list(entry.eager.handles)
    assert handles and all(h in _fuse._EAGER for h in handles)
    del compiled, entry
    import gc

    gc.collect()
    assert not any(h in _fuse._EAGER for h in handles)


@pytest.mark.measured_choice
def test_calls_the_fused_graph_was_not_built_for_run_the_eager_graph(keep_any, dense_choices):
    model = _mlp()
    x = torch.randn(6, 64)
    compiled = sparsecc.compile(model, (x,), fuse=True)
    [entry] = _entries(compiled)
    served = entry.calls
    threads = torch.get_num_threads()
    nan = x.clone()
    nan[2, 5] = float("nan")
    with torch.no_grad():
        calls = {"another batch": torch.randn(3, 64), "other strides": torch.randn(64, 6).t(), "non-finite": nan}
        for what, inputs in calls.items():
            out, expected = compiled(inputs), model(inputs)
            assert out.shape == expected.shape and out.dtype == expected.dtype, what
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * float(expected.nan_to_num().abs().max()),
                                       equal_nan=True, msg=what)
        assert torch.isnan(compiled(nan)[2]).all() and not torch.isnan(compiled(nan)[[0, 1, 3, 4, 5]]).any()
        torch.set_num_threads(threads + 1)
        try:
            assert_equivalent(compiled(x), model(x))
        finally:
            torch.set_num_threads(threads)
    grad_out = compiled(x)                  # grad mode on: the eager graph, which keeps autograd's rules
    assert_equivalent(grad_out.detach(), model(x).detach())
    assert entry.calls == served
    with torch.no_grad():
        compiled(x)
    assert entry.calls == served + 1


@pytest.mark.measured_choice
def test_keyword_calls_in_any_order_reach_the_fused_graph(keep_any, dense_choices):
    torch.manual_seed(0)
    model = pruned(TwoInputs())
    left, right = torch.randn(4, 32), torch.randn(4, 16)
    compiled = sparsecc.compile(model, example_kwargs={"right": right, "left": left}, fuse=True)
    [entry] = _entries(compiled)
    served = entry.calls
    with torch.no_grad():
        assert_equivalent(compiled(left=left, right=right), model(left=left, right=right))
        assert_equivalent(compiled(left, right), model(left, right))
    assert entry.calls == served + 2


@pytest.mark.measured_choice
def test_tuple_outputs_and_defaulted_parameters_reach_the_fused_graph(keep_any, dense_choices):
    torch.manual_seed(0)
    model = pruned(TupleAndDefaults())
    x = torch.randn(5, 32)
    compiled = sparsecc.compile(model, (x,), fuse=True)
    [note] = _fuse_notes(compiled)
    assert "kept for calls like the example" in note and "output 1" in note, note
    [entry] = _entries(compiled)
    served = entry.calls
    with torch.no_grad():
        for inputs in (x, torch.randn(5, 32)):
            out, expected = compiled(inputs), model(inputs)
            assert type(out) is tuple and len(out) == 2
            for actual, wanted in zip(out, expected):
                assert_equivalent(actual, wanted)
        with pytest.raises(InputError, match="'mask' were not in the example call"):   # so baking it is safe
            compiled(x, torch.ones(5, 64))
    assert entry.calls == served + 2


@pytest.mark.measured_choice
def test_a_fused_graph_that_is_not_faster_is_not_kept(monkeypatch, dense_choices):
    monkeypatch.setattr(_fuse, "FUSE_MARGIN", 100.0)
    model = _mlp()
    x = torch.randn(6, 64)
    compiled = sparsecc.compile(model, (x,), fuse=True)
    [note] = _fuse_notes(compiled)
    assert "not kept (not 10000% faster)" in note and " ms fused " in note and " ms eager" in note, note
    assert _entries(compiled) == []
    with torch.no_grad():
        assert_equivalent(compiled(x), model(x))


@pytest.mark.measured_choice
def test_the_measurement_decides_and_the_model_stays_right_either_way(dense_choices):
    model = _mlp()
    x = torch.randn(6, 64)
    compiled = sparsecc.compile(model, (x,), fuse=True)
    [note] = _fuse_notes(compiled)
    assert ("kept for calls like the example" in note) == bool(_entries(compiled)), note
    with torch.no_grad():
        assert_equivalent(compiled(x), model(x))


def _nonsense(*inputs):
    return torch.zeros(inputs[0].shape[0], 10)


def _failing(*inputs):
    raise RuntimeError("expected size 30==30, stride 1==784")


@pytest.mark.parametrize("graph,says", [
    (_nonsense, "not kept: compiled model differs"),        # fails validation
    (_failing, "not kept: it failed to run (RuntimeError: expected size 30==30, stride 1==784)"),
])
def test_a_fused_graph_failing_validation_or_to_run_is_dropped_with_the_reason(monkeypatch, keep_any, graph, says):
    monkeypatch.setattr(_fuse, "fused_graph",
                        lambda gm, inputs, dtype, threads, defaults: (graph, 0, 3, _fuse.EagerCalls()))
    model = _mlp()
    x = torch.randn(6, 64)
    compiled = sparsecc.compile(model, (x,), fuse=True)
    [note] = _fuse_notes(compiled)
    assert says in note, note
    assert _entries(compiled) == []
    with torch.no_grad():
        assert_equivalent(compiled(x), model(x))


def test_inductor_failing_leaves_the_eager_graph_with_the_reason(monkeypatch):
    import torch._inductor.compile_fx as compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    model = _mlp()
    x = torch.randn(6, 64)
    compiled = sparsecc.compile(model, (x,), fuse=True)
    [note] = _fuse_notes(compiled)
    assert "not fused: inductor could not compile the graph (RuntimeError: no C++ compiler here)" in note, note
    with torch.no_grad():
        assert_equivalent(compiled(x), model(x))


def test_fuse_at_several_thread_counts_restores_torchs(keep_any):
    model = _mlp()
    x = torch.randn(6, 64)
    threads = torch.get_num_threads()
    compiled = sparsecc.compile(model, (x,), fuse=[1, 2, 1])
    assert torch.get_num_threads() == threads
    assert [n.split(":")[0] for n in _fuse_notes(compiled)] == ["fuse at 1 thread(s)", "fuse at 2 thread(s)"]
    assert sorted(e.threads for e in _entries(compiled)) == [1, 2]


@pytest.mark.parametrize("choices", [pytest.param("dense", marks=pytest.mark.measured_choice), "sparse"])
def test_a_model_whose_layers_were_swapped_in_place_is_fused_by_torch_compile(monkeypatch, request, keep_any,
                                                                              choices):
    """No captured graph (module swapping): torch.compile compiles a copy of the model whose layers are
    torch's op (dense by choice) or `EagerCall`s (sparse), and serves calls like the example."""
    from sparsecc.capture.graph import Captured

    monkeypatch.setattr(pipeline, "capture", lambda model, inputs=None: Captured(None, "module swapping", "forced"))
    if choices == "dense":
        request.getfixturevalue("dense_choices")
    model = _mlp()
    x = torch.randn(6, 64)
    compiled = sparsecc.compile(model, (x,), fuse=True)
    assert not isinstance(compiled.module, torch.fx.GraphModule)
    [note] = _fuse_notes(compiled)
    assert "kept for calls like the example" in note, note
    [entry] = _entries(compiled)
    assert entry.order is None and (entry.dense, entry.sparse) == ((3, 0) if choices == "dense" else (0, 3))
    assert len(entry.eager.handles) == entry.sparse
    served = entry.calls
    with torch.no_grad():
        for inputs in (x, torch.randn(6, 64)):
            assert_equivalent(compiled(inputs), model(inputs))
        assert entry.calls == served + 2
        other = torch.randn(3, 64)          # another batch: the eager model
        assert_equivalent(compiled(other), model(other))
    assert entry.calls == served + 2


def test_a_hugging_face_encoder_at_bf16_is_fused_with_its_keyword_call(keep_any):
    """BERT (layers swapped in place, keyword inputs, a ModelOutput) at ``precision="bf16"``: the fused model
    answers the same structure and values as the user's model within the bf16 tolerance."""
    from tests.test_huggingface import bert, tokens

    model = bert()
    ids = tokens(12)
    call = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    compiled = sparsecc.compile(model, example_kwargs=call, precision="bf16", fuse=True)
    [note] = _fuse_notes(compiled)
    assert "kept for calls like the example" in note, note
    [entry] = _entries(compiled)
    served = entry.calls
    with torch.no_grad():
        out, expected = compiled(**call), model(**call)
        assert type(out) is type(expected)
        _check(out.last_hidden_state, expected.last_hidden_state, "bf16")
        _check(out.pooler_output, expected.pooler_output, "bf16")
        other = dict(input_ids=tokens(7), attention_mask=torch.ones(1, 7, dtype=torch.long))    # another length
        _check(compiled(**other).last_hidden_state, model(**other).last_hidden_state, "bf16")
        swapped = dict(attention_mask=call["attention_mask"], input_ids=ids)      # other keyword order: eager
        _check(compiled(**swapped).last_hidden_state, expected.last_hidden_state, "bf16")
        _check(compiled(ids).last_hidden_state, model(ids).last_hidden_state, "bf16")     # positional: eager
    assert entry.calls == served + 1


@pytest.mark.parametrize("kwargs,message", [
    ({"fuse": True}, "pass example_inputs"),
    ({"fuse": [0]}, "thread counts >= 1"),
    ({"fuse": ["2"]}, "thread counts >= 1"),
    ({"fuse": True, "backend": "onnxruntime"}, "leave fuse off"),
])
def test_fuse_arguments_are_checked(kwargs, message):
    model = _mlp()
    example = () if kwargs.get("backend") is None and kwargs["fuse"] is True else (torch.randn(2, 64),)
    with pytest.raises(InputError, match=message):
        sparsecc.compile(model, example, **kwargs)


def test_copies_leave_the_fused_graph_behind(keep_any):
    model = _mlp()
    x = torch.randn(6, 64)
    compiled = sparsecc.compile(model, (x,), fuse=True)
    assert _entries(compiled)
    copied = copy.deepcopy(compiled)
    assert copied.__dict__["_fused"] == {} and _entries(compiled)
    with torch.no_grad():
        assert_equivalent(copied(x), model(x))
