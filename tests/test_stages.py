"""The compile pipeline's stage results: each stage returns one frozen `StageResult`, the report is built from
them in stage order (`Report.built`), and no stage writes a report."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparsecc
from sparsecc.compiler import pipeline
from sparsecc.core.report import ErrorStat, LayerChange, LayerReport, Report, StageResult
from sparsecc.tooling.synthetic import fanin_mask


def _row(name: str) -> LayerReport:
    return LayerReport(name=name, kind="linear", shape=(8, 16), structure="fan-in k=2", density=0.125, ablated=0,
                       mask_source="prune", action="condensed_linear", reason="", runtime="reference",
                       bytes_dense=512, bytes_condensed=96, macs_dense=128, macs_sparse=16)


def test_the_report_folds_the_results_in_stage_order():
    ok = ErrorStat("output", 1e-7, 1e-7, 1e-5, True)
    results = [
        StageResult("masks", "2 weights", notes=("first",)),
        StageResult("narrow", None),
        StageResult("analyse", "2/2 layers condensable", rows=(_row("a.weight"), _row("b.weight")), runtime="tvm"),
        StageResult("bind", "runtimes tvm", changes=(("a.weight", LayerChange(runtime="tvm")),
                                                     ("b.weight", LayerChange(runtime="tvm", reason="why")))),
        StageResult("condense", "1 layer(s) rewritten", rewrites=(("condensed_linear", 1),),
                    changes=(("b.weight", LayerChange(kept="not rewritten")),), notes=("second",)),
        StageResult("tune", "1 dense", changes=(("a.weight", LayerChange(choice="dense op", runs_dense=True)),)),
        StageResult("tune", "again", changes=(("a.weight", LayerChange(runs_dense=True)),)),
        StageResult("validate", "ok", end_to_end=(ok,), changes=(("a.weight", LayerChange(error=ok, positions=4)),)),
    ]
    report = Report.built(results)
    a, b = report.layers
    assert (a.runtime, a.choice, a.error, a.positions) == ("tvm+dense", "dense op", ok, 4)   # one suffix, not two
    assert (b.action, b.runtime, b.reason, b.bytes_condensed, b.macs_sparse) == ("kept", "torch", "not rewritten",
                                                                                   512, 128)
    assert report.runtime == "tvm" and report.rewrites == {"condensed_linear": 1}
    assert report.notes == ["first", "second"] and report.validated and report.end_to_end == [ok]
    assert [(s.stage, s.ran) for s in report.stages] == [(r.stage, r.applies) for r in results]
    assert report.condensed == [a]
    # The results are untouched by the building: the same results build the same report again.
    assert str(Report.built(results)) == str(report) and results[2].rows[1].action == "condensed_linear"


def test_stage_results_and_rows_are_frozen():
    result = StageResult("masks", "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.summary = "y"
    with pytest.raises(dataclasses.FrozenInstanceError):
        _row("a.weight").runtime = "torch"


def test_a_compile_keeps_one_result_per_stage_and_its_report_is_built_from_them():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    for i in (0, 2):
        prune.custom_from_mask(model[i], "weight", fanin_mask(model[i].weight, 0.9))
    x = torch.randn(2, 32)
    compiled = sparsecc.compile(model, (x,), backend="reference")
    results = compiled.__dict__["_results"]
    assert [r.stage for r in results] == [name for name, _ in pipeline.STAGES]
    assert all(isinstance(r, StageResult) for r in results)
    assert str(Report.built(results)) == str(compiled.report)
    assert compiled.report.validated and {lay.name for lay in compiled.report.condensed} == {"0.weight", "2.weight"}
    y = compiled(x)
    expected = model(x)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_recorded_choices_are_a_result_of_their_own():
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.9))
    compiled = sparsecc.compile(model, (torch.randn(1, 64),), backend="reference")
    before = len(compiled.__dict__["_results"])
    compiled(torch.randn(40, 64))           # another token count: another choice
    compiled.record_choices()
    assert len(compiled.__dict__["_results"]) == before + 1 and compiled.report.stages[-1].stage == "choices"
    choice = compiled.report.layers[0].choice
    assert choice.count(";") >= 1, choice  # both token counts' choices


def test_the_graph_route_is_taken_once_at_capture(monkeypatch):
    from sparsecc.capture.graph import Captured

    model = nn.Sequential(nn.Linear(32, 32)).eval()
    prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, 0.9))
    x = torch.randn(2, 32)
    c = pipeline.run(pipeline.Compilation(model, None, sparsecc.core.inputs.Call((x,)), _options()))
    assert isinstance(c.route, pipeline.GraphRoute) and isinstance(c.module, torch.fx.GraphModule)
    monkeypatch.setattr(pipeline, "capture", lambda model, inputs=None: Captured(None, "module swapping", "forced"))
    c = pipeline.run(pipeline.Compilation(model, None, sparsecc.core.inputs.Call((x,)), _options()))
    assert isinstance(c.route, pipeline.SwapRoute) and not isinstance(c.module, torch.fx.GraphModule)
    assert c.report.capture == "module swapping" and c.report.capture_reason == "forced"
    y, expected = c.module(x), model(x)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def _options() -> "pipeline.Options":
    return pipeline.Options(backend="reference", runtime="reference", validate=True, autotune=False, narrow=True,
                            has_inputs=True)
