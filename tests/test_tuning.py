"""The measured sparse-or-dense choice: per token bucket and thread count, applied at call time on every path,
reported, cached on disk (re-measured when an entry is corrupt), switched off by ``autotune=False``. Timing
itself is the benchmarks' business: here a stand-in clock decides, and outputs are checked either way."""

import json
import re

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import sparsecc
from sparsecc.core import timing
from sparsecc.runtimes import dense, tuning, unavailable
from sparsecc.tooling.synthetic import fanin_mask, nm_mask
from tests.conftest import assert_equivalent
from tests.test_chain import spy  # noqa: F401 - a fixture: which chained calls the runtime chained

pytestmark = [pytest.mark.measured_choice,
              pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}")]


def _clock(monkeypatch, sparse_faster_up_to: int):
    """A stand-in for the interleaved medians: the sparse kernel wins up to ``sparse_faster_up_to`` tokens."""
    calls = []

    def medians(fns, **kwargs):
        if "dense" not in fns:         # the tile search: any tile will do
            return {name: 1e-4 for name in fns}
        if "chosen" in fns:            # the whole-model check: the layers' choices stand
            fns["dense"]()
            fns["chosen"]()
            return {"chosen": 1e-4, "dense": 2e-4}
        out = fns["dense"]()
        tokens = out.numel() // out.shape[-1] if out.dim() else 1
        calls.append(tokens)
        return {"sparse": 1e-4 if tokens <= sparse_faster_up_to else 3e-4, "dense": 2e-4}

    monkeypatch.setattr(timing, "medians", medians)
    return calls


def _model(structure="fanin"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    mask = fanin_mask(model[0].weight, 0.75, 0.1) if structure == "fanin" else nm_mask(model[0].weight)
    prune.custom_from_mask(model[0], "weight", mask)
    return model


def _spy(compiled):
    """The paths (``"sparse"`` / ``"dense"``) the model's one condensed layer runs, in call order. The TVM
    binding keeps one route per token bucket (its calls from then on are logged by the path its measured
    choice took); the reference one calls its ``sparse`` / ``dense`` methods (a measurement's calls logged
    too)."""
    from sparsecc.core.layers import CondensedLayer

    layer = next(m for m in compiled.modules() if isinstance(m, CondensedLayer))
    bound = layer.__dict__["_bound"][2]
    log = []
    if hasattr(bound, "routes"):
        route = bound._route

        def logged_route(x, key):
            fn = route(x, key)
            path = "dense" if key in bound.choices and bound.choices[key].dense else "sparse"
            logged = bound.routes[key] = lambda x: (log.append(path), fn(x))[1]
            return logged

        bound._route = logged_route
        bound.routes.clear()         # routed again (from the measured choices) through the spy
        return layer, log
    for path in ("sparse", "dense"):
        original = getattr(bound, path)

        def logged(x, *tile, path=path, original=original):
            log.append(path)
            return original(x, *tile)

        setattr(bound, path, logged)
    return layer, log


@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_sparse_at_few_tokens_dense_at_many(monkeypatch, tmp_path, structure):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("sparsecc.runtimes.tvm.runtime._tuning", None)
    _clock(monkeypatch, sparse_faster_up_to=4)
    model = _model(structure)
    compiled = sparsecc.compile(model, (torch.randn(1, 64),), backend="tvm")
    entry = next(lay for lay in compiled.report.layers if lay.name == "0.weight")
    threads = torch.get_num_threads()
    assert entry.choice == f"sparse kernel at 1 token(s), {threads} thread(s): sparse 100 us vs dense (plain) 200 us"
    assert entry.runtime == "tvm"
    assert "measured choice" in str(compiled.report)
    layer, log = _spy(compiled)
    for tokens, path in ((1, "sparse"), (3, "sparse"), (37, "dense"), (1, "sparse"), (40, "dense")):
        x = torch.randn(tokens, 64)
        out = compiled(x)
        expected = model(x)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert_equivalent(out, expected)
        assert log[-1] == path, (tokens, log)
    assert {key[0]: c.dense for key, c in layer.choices().items()} == {1: False, 3: False, 64: True}


def test_autotune_false_runs_the_sparse_kernels_everywhere(monkeypatch):
    calls = _clock(monkeypatch, sparse_faster_up_to=0)
    model = _model()
    compiled = sparsecc.compile(model, (torch.randn(5, 64),), backend="tvm", autotune=False)
    assert all(not lay.choice for lay in compiled.report.layers)
    layer, log = _spy(compiled)
    x = torch.randn(50, 64)
    assert_equivalent(compiled(x), model(x))
    assert log == ["sparse"] and not layer.choices() and not calls


def test_a_dense_choice_is_reported_and_still_exact(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("sparsecc.runtimes.tvm.runtime._tuning", None)
    _clock(monkeypatch, sparse_faster_up_to=0)
    model = _model()
    x = torch.randn(2, 7, 64)
    compiled = sparsecc.compile(model, (x,), backend="tvm")
    entry = next(lay for lay in compiled.report.layers if lay.name == "0.weight")
    assert entry.runtime == "tvm+dense" and entry.choice.startswith("dense op at 14 token(s)")
    out, expected = compiled(x), model(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    # The same choice on the graph paths: torch.compile's graph calls the op, which binds the same way.
    graph = torch.compile(compiled.module, backend="eager")
    assert_equivalent(graph(x), expected)


def _cache(tmp_path):
    return tuning.TuningCache({"target": "test"}, tmp_path)


def test_cache_on_disk_corrupt_entries_and_thread_counts(monkeypatch, tmp_path):
    calls = _clock(monkeypatch, sparse_faster_up_to=4)
    x = torch.randn(16, 8)
    weight = torch.randn(8, 8)
    sparse, dense = (lambda: x @ weight.T), (lambda: x @ weight.T)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = tuning.choose(_cache(tmp_path), ("sig",), 16, sparse, dense)
        assert first.dense and first.tokens == 16 and first.threads == 1 and len(calls) == 1
        again = _cache(tmp_path)          # a new process: read from disk, nothing measured
        assert tuning.choose(again, ("sig",), 13, sparse, dense) == first
        assert again.stats == {"memory": 0, "disk": 1, "measured": 0} and len(calls) == 1
        torch.set_num_threads(2)          # another thread count is another key
        assert tuning.choose(_cache(tmp_path), ("sig",), 16, sparse, dense).threads == 2 and len(calls) == 2
        torch.set_num_threads(1)
        entries = sorted(tmp_path.glob("*.json"))
        assert len(entries) == 2
        for entry in entries:
            entry.write_text("{ truncated")
        fresh = _cache(tmp_path)
        assert tuning.choose(fresh, ("sig",), 16, sparse, dense) == first
        assert fresh.stats["measured"] == 1 and len(calls) == 3
        rewritten = [json.loads(e.read_text()) for e in entries if e.read_text() != "{ truncated"]
        assert [entry["choice"]["threads"] for entry in rewritten] == [1]      # rewritten whole, the other left
        other = tuning.TuningCache({"target": "another"}, tmp_path)   # another machine or version: its own key
        tuning.choose(other, ("sig",), 16, sparse, dense)
        assert other.stats["measured"] == 1 and len(calls) == 4
    finally:
        torch.set_num_threads(before)


def test_buckets():
    assert [tuning.bucket(t) for t in (1, 2, 3, 4, 5, 8, 9, 128, 197, 256, 257)] == \
        [1, 2, 3, 4, 8, 8, 16, 128, 256, 256, 512]


def test_real_measurement_on_a_2to4_layer_at_many_tokens(monkeypatch, tmp_path):
    """No stand-in: the runtime measures both paths; whichever runs, the output equals the user's model and
    the report's choice agrees with its own timings."""
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("sparsecc.runtimes.tvm.runtime._tuning", None)
    model = nn.Sequential(nn.Linear(256, 256)).eval()
    prune.custom_from_mask(model[0], "weight", nm_mask(model[0].weight))
    x = torch.randn(1, 197, 256)
    compiled = sparsecc.compile(model, (x,), backend="tvm")
    (choice,) = compiled.module.get_submodule("0").choices().values()
    # 197 tokens: dense unless sparse measured `SPARSE_MARGIN` faster, or the whole model ran faster dense
    assert choice.dense == (choice.sparse_s * (1 + tuning.SPARSE_MARGIN) > choice.dense_s or choice.whole_model)
    assert any("runs every layer dense" in n for n in compiled.report.notes) is choice.whole_model
    assert choice.sparse_s > 0 and choice.dense_s > 0
    assert compiled.report.layers[0].choice == choice.describe()
    out, expected = compiled(x), model(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    entries = [json.loads(e.read_text()) for e in tmp_path.glob("tuning/*.json")]
    # one tile search (its key lists the candidate tiles; a dense-form search too where float32 has packed
    # forms), one sparse-or-dense choice on the chosen tile and form
    searches = 2 if dense.packs(torch.float32) else 1
    assert sorted('"tiles"' in e["key"] for e in entries) == [False] + [True] * searches
    assert sum("dense forms" in e["key"] for e in entries) == searches - 1
    assert choice.tile and f"(tile {choice.tile})" in compiled.report.layers[0].choice
    assert choice.dense_form in (dense.PACKED, dense.PLAIN)
    assert f"dense ({choice.dense_form})" in compiled.report.layers[0].choice


def test_choices_survive_a_restart_and_are_measured_again_on_another_cpu(monkeypatch, tmp_path):
    """The on-disk choices (tile search and sparse-or-dense) are keyed on the CPU's model and ISA: a new process
    on the same machine measures nothing, the same cache directory on another CPU measures again."""
    from sparsecc.runtimes import cpu
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    calls = _clock(monkeypatch, sparse_faster_up_to=0)
    searches = []
    real_medians = timing.medians

    def counted(fns, **kwargs):
        if "dense" not in fns:
            searches.append(sorted(fns))
        return real_medians(fns, **kwargs)

    monkeypatch.setattr(timing, "medians", counted)
    model = _model()
    x = torch.randn(20, 64)

    def compile_fresh():
        tvm_runtime.forget_caches()       # what a new process starts from
        return sparsecc.compile(model, (x,), backend="tvm")

    # the searches: the sparse kernel's tiles, and the dense op's forms where this torch packs float32
    per_compile = 2 if dense.packs(torch.float32) else 1
    first = compile_fresh()
    assert len(calls) == 1 and len(searches) == per_compile
    assert tvm_runtime.tuning_cache().fingerprint["cpu"] == cpu.model()
    again = compile_fresh()
    assert len(calls) == 1 and len(searches) == per_compile           # read from disk
    assert again.report.layers[0].choice == first.report.layers[0].choice
    monkeypatch.setattr(cpu, "identity", lambda: {"cpu": "Another CPU", "isa": "avx2 fma"})
    other = compile_fresh()
    assert len(calls) == 2 and len(searches) == 2 * per_compile       # another CPU: measured again
    assert tvm_runtime.tuning_cache().fingerprint["cpu"] == "Another CPU"
    out, expected = other(x), model(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    tvm_runtime.forget_caches()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("structure", ["fanin", "2:4"])
@pytest.mark.parametrize("backend", ["tvm", "reference"])
def test_measured_choice_against_the_dense_op_in_the_models_dtype(monkeypatch, tmp_path, dtype, structure, backend):
    """bf16 / fp16 layers run the TVM kernels (values in the layer's dtype, float32 arithmetic) or, on the
    reference runtime, its gather; either way the kernel is measured against the dense op on the decoded weight
    in that dtype (oneDNN's AMX GEMM on bf16 here) and the faster runs: a compiled bf16 model is never the
    10-20x slower gather."""
    from sparsecc.runtimes.reference import runtime as reference

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("sparsecc.runtimes.tvm.runtime._tuning", None)
    reference.forget_caches()
    _clock(monkeypatch, sparse_faster_up_to=1)
    model = _model(structure).to(dtype)
    compiled = sparsecc.compile(model, (torch.randn(1, 64, dtype=dtype),), backend=backend)
    entry = next(lay for lay in compiled.report.layers if lay.name == "0.weight")
    assert entry.runtime == backend
    # bf16 TVM layers also measure the bit-mask form against the gather one: the report names the winner.
    assert re.fullmatch(rf"sparse kernel at 1 token\(s\), {torch.get_num_threads()} thread\(s\): "
                        r"sparse( \(tile (gather|bitmask)\))? 100 us vs dense( \(plain\))? 200 us", entry.choice), entry.choice
    layer, log = _spy(compiled)
    for tokens, path in ((1, "sparse"), (20, "dense"), (1, "sparse")):
        x = torch.randn(tokens, 64, dtype=dtype)
        out, expected = compiled(x), model(x)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert_equivalent(out, expected)
        assert log[-1] == path, (tokens, log)
    assert {key[0]: c.dense for key, c in layer.choices().items()} == {1: False, 32: True}
    if backend == "reference":
        assert {key[2] for key in layer.choices()} == {dtype}       # the dtype is part of the choice's key
    else:   # the layer's dtype is part of the choice's key on disk
        keys = [json.loads(p.read_text())["key"] for p in (tmp_path / "tuning").rglob("*.json")]
        assert keys and all(str(dtype).removeprefix("torch.") in key for key in keys), keys
    reference.forget_caches()



def test_short_calls_get_more_rounds_within_the_budget(monkeypatch):
    """`timing.medians` with a budget: calls much shorter than the budget get more rounds than asked (up to
    ``max_runs``); calls as long as the budget keep the minimum. The calls take their time on a clock of the
    test's own (a loaded machine would otherwise decide how many rounds fit)."""
    import types

    now = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    calls = {"fast": 0, "slow": 0}

    def counted(name, seconds):
        def fn():
            calls[name] += 1
            now[0] += seconds
        return fn

    timing.medians({"fast": counted("fast", 1e-4)}, runs=5, warmup=1, budget_s=0.05, max_runs=40)
    assert calls["fast"] == 1 + 40
    timing.medians({"slow": counted("slow", 0.02)}, runs=5, warmup=1, budget_s=0.01, max_runs=40)
    assert calls["slow"] == 1 + 5


def test_settle_calls_open_each_turn_untimed(monkeypatch):
    """`timing.medians(settle=)`: a method's first call after another method's pays for that one's spinning
    thread pool (here 10 s on the test's clock, 1 s otherwise); the settle calls take that cost untimed."""
    import types

    now = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    last, calls = [None], {"a": 0, "b": 0}

    def method(name):
        def fn():
            calls[name] += 1
            now[0] += 1.0 if last[0] == name else 10.0
            last[0] = name
        return fn

    fns = {"a": method("a"), "b": method("b")}
    assert timing.medians(fns, runs=4, warmup=1) == {"a": 10.0, "b": 10.0}
    calls.update(a=0, b=0)
    assert timing.medians(fns, runs=4, warmup=1, settle=2) == {"a": 1.0, "b": 1.0}
    assert calls == {"a": 1 + 4 * 3, "b": 1 + 4 * 3}


def test_onnxruntime_sessions_do_not_spin_between_runs(tmp_path):
    """A spinning onnxruntime pool takes the cores of torch's next ops in the same process (the peers in a
    benchmark, or a model compiled for onnxruntime called between torch ops)."""
    from sparsecc.runtimes.onnxruntime import engine

    path = tmp_path / "m.onnx"
    torch.onnx.export(nn.Linear(4, 3).eval(), (torch.randn(1, 4),), str(path), dynamo=False)
    options = engine.session(path, threads=2).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2


def test_decode_sized_calls_of_models_beyond_l2_are_measured_with_l2_flushed(monkeypatch, tmp_path):
    """A model larger than one core's L2 (but not than the last-level cache): its one-token calls are measured
    with L2 flushed before every timed call (the tile search, the dense forms and the sparse-or-dense choice),
    its many-token calls warm; the report says which."""
    from sparsecc.compiler import autotune
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tvm_runtime, "_tuning", None)
    monkeypatch.setattr(tuning, "l2_bytes", lambda: 1024)
    befores = []
    real = timing.medians

    def medians(fns, **kwargs):
        if "chosen" not in fns:        # a layer's measurements (not the whole-model check, which runs warm)
            befores.append((sorted(fns), kwargs.get("before")))
        return real(fns, **kwargs)

    monkeypatch.setattr(timing, "medians", medians)
    model = _model()
    compiled = sparsecc.compile(model, (torch.randn(1, 64),), backend="tvm")
    layer = compiled.module.get_submodule("0")
    values = layer._buffers["values"]
    assert not tuning.streaming(values) and tuning.l2_cold(values, 1) and not tuning.l2_cold(values, 5)
    assert befores and all(before is tuning._flush_l2 for _, before in befores), befores
    (choice,) = layer.choices().values()
    assert choice.l2_cold and not choice.cold and ", L2 flushed:" in choice.describe()
    entry = next(lay for lay in compiled.report.layers if lay.name == "0.weight")
    assert "L2 flushed" in entry.choice
    befores.clear()
    x = torch.randn(9, 64)                       # many tokens: measured warm
    out, expected = compiled(x), model(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    assert befores and all(before is None for _, before in befores), befores
    assert not layer.choices()[(16, torch.get_num_threads())].l2_cold
    # a model beyond the last-level cache is measured cold instead, at every token count
    monkeypatch.setattr(tuning, "llc_bytes", lambda: 2048)
    assert autotune.stream_if_large(compiled.module)
    assert tuning.streaming(values) and not tuning.l2_cold(values, 1)
    tvm_runtime.forget_caches()


@pytest.mark.parametrize("tokens, sparse_s, dense", [
    (1, 1.00e-4, False), (1, 1.04e-4, False), (1, 1.06e-4, True), (1, 3e-4, True),           # decode-sized
    (16, 0.50e-4, False), (16, 0.90e-4, False), (16, 0.95e-4, True), (16, 1.02e-4, True)])   # many tokens
def test_near_ties_go_where_they_win_in_a_model(monkeypatch, tmp_path, tokens, sparse_s, dense):
    """Decode-sized calls run dense only where it measured `DENSE_MARGIN` faster than the sparse kernel;
    many-token calls run sparse only where it measured `SPARSE_MARGIN` faster than dense."""
    monkeypatch.setattr(timing, "medians", lambda fns, **kwargs: {"sparse": sparse_s, "dense": 1e-4})
    choice = tuning.choose(_cache(tmp_path), ("sig",), tokens, lambda: None, lambda: None)
    assert choice.dense is dense and choice.sparse_s == sparse_s and choice.dense_s == 1e-4


def _mlp(tokens: int = 40):
    """fc1 -> GELU -> fc2, both sparse (the chain pass chains them), called on ``tokens`` tokens."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    for layer in (model[0], model[2]):
        prune.custom_from_mask(layer, "weight", fanin_mask(layer.weight, 0.75))
    return model, torch.randn(tokens, 64)


def _whole_model_clock(monkeypatch, dense_faster: bool, model_s: float = 2e-3):
    """Layers alone: the sparse kernel wins (any tile) by 0.2 ms each. The whole model: ``model_s`` with the
    layers' choices (2 ms: their gains are no clear margin, `autotune.CLEAR_GAIN`), and dense wins or loses, as
    asked; both ways are run, so the switch between them is exercised."""
    seen = []

    def medians(fns, **kwargs):
        if "model" in fns:
            fns["model"]()
            seen.append(["model"])
            return {"model": model_s}
        if "chosen" in fns:
            for fn in fns.values():
                fn()
            seen.append(sorted(fns))
            return {"chosen": 2e-3, "dense": 1e-3 if dense_faster else 3e-3}
        if "dense" in fns:
            fns["dense"]()
            fns["sparse"]()
            return {"sparse": 1e-4, "dense": 3e-4}
        return {name: 1e-4 for name in fns}

    monkeypatch.setattr(timing, "medians", medians)
    return seen


def _bounds(compiled):
    from sparsecc.core.layers import CondensedLayer

    return [m.__dict__["_bound"][2] for m in compiled.module.modules() if isinstance(m, CondensedLayer)]


@pytest.mark.parametrize("dense_faster", [True, False])
def test_the_whole_model_runs_dense_where_its_sparse_choices_lose_together(monkeypatch, tmp_path, dense_faster, spy):
    """Each layer's sparse kernel won alone; the whole model is timed with those choices and all dense, and
    keeps the faster: every such layer's choice says so, the report's note gives both times, the chained MLP
    path steps aside, and the model equals the user's either way."""
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tvm_runtime, "_tuning", None)
    seen = _whole_model_clock(monkeypatch, dense_faster)
    model, x = _mlp()
    chained = spy                                   # whether each chained call ran chained
    compiled = sparsecc.compile(model, (x,), backend="tvm")
    assert seen == [["model"], ["chosen", "dense"]]
    bounds = _bounds(compiled)
    assert len(bounds) == 2
    key = (tuning.bucket(x.shape[0]), torch.get_num_threads())
    for bound in bounds:
        choice = bound.choices[key]
        assert choice.dense is dense_faster and choice.whole_model is dense_faster
        assert bound.sparse_buckets() == ([] if dense_faster else [key])
        assert bound.dense_forms(x).held() == ((dense.PLAIN,) if dense_faster else ())
    (note,) = [n for n in compiled.report.notes if n.startswith("whole model")]
    assert "2.00 ms with the layers' choices" in note
    assert ("runs every layer dense" in note) is dense_faster and ("keeps its 2 layer(s)" in note) is not dense_faster
    entry = next(lay for lay in compiled.report.layers if lay.name == "0.weight")
    assert ("dense op (whole model faster dense)" in entry.choice) is dense_faster, entry.choice
    chained.clear()
    for inputs in (x, torch.randn(33, 64)):       # the same bucket
        out, expected = compiled(inputs), model(inputs)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert_equivalent(out, expected)
        with torch.no_grad():
            assert_equivalent(out, sparsecc.masked_reference(model)(inputs))
    assert chained and all(c is not dense_faster for c in chained)   # chained only where both run sparse


def test_layers_gains_of_half_the_models_time_are_not_timed_all_dense(monkeypatch, tmp_path):
    """Where the layers' measured gains add up to `autotune.CLEAR_GAIN` of the model's time, the model is timed
    with its choices only: they stand, no dense form is built for the check, the note says why, and the model
    equals the user's."""
    from sparsecc.compiler import autotune
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tvm_runtime, "_tuning", None)
    seen = _whole_model_clock(monkeypatch, dense_faster=True, model_s=0.7e-3)
    assert 2 * 0.2e-3 >= autotune.CLEAR_GAIN * 0.7e-3           # two layers' gains: past the share of the model
    model, x = _mlp()
    compiled = sparsecc.compile(model, (x,), backend="tvm")
    assert seen == [["model"]]                           # not timed all dense
    key = (tuning.bucket(x.shape[0]), torch.get_num_threads())
    for bound in _bounds(compiled):
        assert not bound.choices[key].dense and not bound.choices[key].whole_model
        assert bound.sparse_buckets() == [key] and bound.dense_forms(x).held() == ()
    (note,) = [n for n in compiled.report.notes if n.startswith("whole model")]
    assert "0.70 ms with the layers' choices" in note and "add up to 0.40 ms" in note
    assert "keeps its 2 layer(s)' sparse choices (a clear margin" in note
    out, expected = compiled(x), model(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    with torch.no_grad():
        assert_equivalent(out, sparsecc.masked_reference(model)(x))


def test_switching_a_bucket_to_dense_and_back_restores_its_route(monkeypatch, tmp_path):
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tvm_runtime, "_tuning", None)
    _whole_model_clock(monkeypatch, dense_faster=False)
    model, x = _mlp()
    compiled = sparsecc.compile(model, (x,), backend="tvm")
    bound = _bounds(compiled)[0]
    (key,) = bound.sparse_buckets()
    sparse_choice, sparse_route = bound.choices[key], bound.routes[key]
    xin = torch.randn(x.shape[0], 64)
    want = torch.nn.functional.linear(xin, bound.dense_forms(xin).weight(), bound.bias_or_none)
    bound.run_dense(key)
    assert bound.choices[key].dense and bound.choices[key].whole_model and bound.sparse_buckets() == []
    assert_equivalent(bound(xin), want)
    bound.run_dense(key, False)
    assert bound.choices[key] == sparse_choice and bound.sparse_buckets() == [key]
    assert bound.routes[key] is sparse_route
    assert_equivalent(bound(xin), want)
    bound.settle()
    assert bound.dense_forms(xin).held() == ()           # no bucket runs dense: its forms are dropped


@pytest.mark.parametrize("dense_faster", [True, False])
def test_the_reference_runtime_takes_the_whole_model_check_too(monkeypatch, tmp_path, dense_faster):
    """bf16 / fp16 layers the TVM kernels do not take run on the reference runtime: its kernels are checked on
    the whole model the same way."""
    from sparsecc.runtimes.reference import runtime as reference

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(reference, "_tuning", None)
    seen = _whole_model_clock(monkeypatch, dense_faster)
    model, x = _mlp()
    compiled = sparsecc.compile(model, (x,), backend="reference")
    assert seen == [["model"], ["chosen", "dense"]]
    for bound in _bounds(compiled):
        (choice,) = bound.choices.values()
        assert choice.dense is dense_faster and choice.whole_model is dense_faster
    dense_calls = []
    real_dense = reference.Tuned.dense
    monkeypatch.setattr(reference.Tuned, "dense", lambda self, x: dense_calls.append(1) or real_dense(self, x))
    out, expected = compiled(x), model(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    assert len(dense_calls) == (2 if dense_faster else 0)


def test_a_call_at_a_new_size_is_checked_on_the_whole_model(monkeypatch, tmp_path):
    """compile checks the example's call size; a later call at another token count settles its layers' choices
    one by one and is then checked the same way, on that size only (the example's stay as they were), and the
    report says so. A call with an input that is not a tensor is not run again."""
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tvm_runtime, "_tuning", None)
    seen = _whole_model_clock(monkeypatch, dense_faster=False)
    model, x = _mlp(tokens=40)
    compiled = sparsecc.compile(model, (x,), backend="tvm")
    assert seen == [["model"], ["chosen", "dense"]]                   # compile: the 64-token bucket, kept sparse
    seen.clear()
    _whole_model_clock(monkeypatch, dense_faster=True).clear()
    other = torch.randn(10, 64)                            # the 16-token bucket: settled now, then checked
    out, expected = compiled(other), model(other)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    threads = torch.get_num_threads()
    for bound in _bounds(compiled):
        assert not bound.choices[(64, threads)].dense                       # compile's bucket untouched
        assert bound.choices[(16, threads)].whole_model                     # the new one: dense, as timed
    assert compiled.report.stages[-1].stage == "whole model"
    assert compiled.report.notes[-1].startswith("whole model at a call on (10, 64),")
    assert "runs every layer dense" in compiled.report.notes[-1]
    calls = len(compiled.report.stages)
    compiled(torch.randn(12, 64))                          # the same bucket again: nothing new to check
    assert len(compiled.report.stages) == calls
    for bound in _bounds(compiled):
        assert bound.sparse_buckets() == [(64, threads)]


def test_calls_with_inputs_that_are_not_tensors_are_not_run_again(monkeypatch, tmp_path):
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 32)

        def forward(self, x, scale=1.0):
            return self.fc(x) * scale

    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tvm_runtime, "_tuning", None)
    seen = _whole_model_clock(monkeypatch, dense_faster=True)
    torch.manual_seed(0)
    model = Scaled().eval()
    prune.custom_from_mask(model.fc, "weight", fanin_mask(model.fc.weight, 0.75))
    compiled = sparsecc.compile(model, (torch.randn(40, 64), 2.0), backend="tvm")
    assert seen == [["model"], ["chosen", "dense"]]
    other = torch.randn(10, 64)
    out, expected = compiled(other, 2.0), model(other, 2.0)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_equivalent(out, expected)
    assert seen == [["model"], ["chosen", "dense"]]                   # not run again: ``scale`` is not a tensor
