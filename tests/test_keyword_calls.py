"""Everything sparsecc hands back is called as the model is: the compiled model, the onnxruntime engine, a
TVM library, a ``.pt2`` loaded in a fresh process (and TensorRT's engine module, whose binding is checked
here without a GPU) take keyword inputs in any order or the leading ones by position, and a missing, unknown
or extra input is an `InputError` that names it. Numbers are compared with the user's model called the same
way."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import InputError, runtimes
from sparsecc.core.inputs import Arrangement, Call
from sparsecc.runtimes.tensorrt import engine as trt_runtime
from sparsecc.tooling import synthetic
from tests.conftest import assert_equivalent

VOCAB = 50
needs_no_gpu = pytest.mark.skipif(trt_runtime.unavailable() is None,
                                  reason="this test checks the error raised where TensorRT cannot run")


class Encoder(nn.Module):
    """Token ids and a mask in, a dict out: the shape of a Hugging Face encoder call, small."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.fc = nn.Linear(32, 64)
        self.out = nn.Linear(64, 16)

    def forward(self, input_ids, attention_mask=None, scale: float = 1.0):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return {"logits": self.out(torch.relu(self.fc(h))) * scale}


def _model() -> nn.Module:
    model = Encoder().eval()
    synthetic.attach_with_prune(model, {"fc.weight": synthetic.fanin_mask(model.fc.weight, 0.75),
                                        "out.weight": synthetic.fanin_mask(model.out.weight, 0.75)})
    return model


def _feeds(batch: int, length: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, length)
    mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


#: The same call three ways: keywords as compiled, keywords reordered, the first input by position.
CALLS = {
    "keywords": lambda f, kw: f(**kw),
    "reordered": lambda f, kw: f(attention_mask=kw["attention_mask"], input_ids=kw["input_ids"]),
    "positional first": lambda f, kw: f(kw["input_ids"], attention_mask=kw["attention_mask"]),
}

#: Calls that must fail, with what the error says.
BAD_CALLS = [
    (lambda f, kw: f(input_ids=kw["input_ids"]), "missing input.*'attention_mask'"),
    (lambda f, kw: f(**kw, mask=kw["attention_mask"]), "no input named 'mask'.*input_ids, attention_mask"),
    (lambda f, kw: f(**kw, scale=2.0), "'scale' were not in the example call"),
    (lambda f, kw: f(kw["input_ids"], input_ids=kw["input_ids"]), "given twice"),
]


def _check_calls(runner, model) -> None:
    for how, call in CALLS.items():
        kw = _feeds(3)
        with torch.no_grad():
            got, want = call(runner, kw)["logits"], call(model, kw)["logits"]
        assert_equivalent(got, want)
    for call, match in BAD_CALLS:
        with pytest.raises(InputError, match=match):
            call(runner, _feeds(2))


@pytest.mark.parametrize("backend", ["reference", "tvm", "onnxruntime"])
def test_compiled_model_and_engine_take_the_models_call(backend):
    model = _model()
    compiled = sparsecc.compile(model, example_kwargs=_feeds(1), backend=backend)
    assert compiled.report.end_to_end and all(s.ok for s in compiled.report.end_to_end)
    _check_calls(compiled, model)


def test_arrangement_lays_calls_out_like_the_example():
    def forward(input_ids, attention_mask=None, *, past=None, **extra):
        return input_ids

    a, m, p = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    arrangement = Arrangement.of(forward, Call((a,), {"past": p, "attention_mask": m}))
    assert arrangement.positional == ("input_ids",) and arrangement.keywords == ("past", "attention_mask")
    for args, kwargs in (((a, m), {"past": p}), ((), {"attention_mask": m, "past": p, "input_ids": a}),
                         ((a,), {"attention_mask": m, "past": p, "token_type_ids": None})):
        call = arrangement.arrange(args, kwargs)
        assert call.args == (a,) and list(call.kwargs) == ["past", "attention_mask"]
        assert [t.item() for t in call.tensors()] == [0.0, 2.0, 1.0]
    again = Arrangement.from_json(arrangement.to_json())
    assert again == arrangement
    with pytest.raises(InputError, match="'token_type_ids' were not in the example call"):
        arrangement.arrange((a, m), {"past": p, "token_type_ids": a})
    with pytest.raises(InputError, match="missing input.*'past'"):
        arrangement.arrange((a, m), {})


def test_tensorrt_engine_binding_without_a_gpu():
    """The engine module binds its call with `runtimes.file_inputs`, as onnxruntime's does: checked here for
    the engine's names, since building one needs a GPU."""
    kw = _feeds(1)
    arrangement = Arrangement.of(Encoder().forward, Call((), kw))
    names = ["input_ids", "attention_mask"]
    got = runtimes.file_inputs(arrangement, (), {"attention_mask": kw["attention_mask"], "input_ids": kw["input_ids"]},
                               names, "tensorrt")
    assert got[0] is kw["input_ids"] and got[1] is kw["attention_mask"]
    with pytest.raises(InputError, match="missing input"):
        runtimes.file_inputs(arrangement, (kw["input_ids"],), {}, names, "tensorrt")
    with pytest.raises(InputError, match="exported with positional inputs"):
        runtimes.file_inputs(None, (), kw, names, "tensorrt")
    with pytest.raises(InputError, match="takes 2 input tensor"):
        runtimes.file_inputs(None, (kw["input_ids"],), {}, names, "tensorrt")


@needs_no_gpu
def test_export_tensorrt_takes_keywords_and_names_the_onnx_inputs(tmp_path):
    with pytest.raises(sparsecc.RuntimeUnavailableError, match="The ONNX file is ready at"):
        sparsecc.export_tensorrt(_model(), (), tmp_path / "m.engine", example_kwargs=_feeds(1))
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]


def test_tvm_library_takes_keywords(tmp_path):
    model = _model()
    exported = sparsecc.export_tvm(model, (), tmp_path / "m.so", example_kwargs=_feeds(1))
    assert exported.input_names == ["input_ids", "attention_mask"]
    library = sparsecc.load_tvm(exported.path)
    kw = _feeds(1)
    with torch.no_grad():
        want = model(**kw)["logits"]
    for got in (library(attention_mask=kw["attention_mask"].numpy(), input_ids=kw["input_ids"].numpy()),
                library(kw["input_ids"].numpy(), attention_mask=kw["attention_mask"].numpy()),
                library(kw["input_ids"].numpy(), kw["attention_mask"].numpy())):
        assert_equivalent(torch.from_numpy(np.asarray(got)), want)
    with pytest.raises(InputError, match="no input named 'mask'"):
        library(input_ids=kw["input_ids"].numpy(), mask=kw["attention_mask"].numpy())
    with pytest.raises(InputError, match="missing input.*'attention_mask'"):
        library(input_ids=kw["input_ids"].numpy())
    with pytest.raises(InputError, match="given twice"):
        library(kw["input_ids"].numpy(), input_ids=kw["input_ids"].numpy())


_LOAD_AND_CALL = """
import sys, torch, sparsecc
model = sparsecc.load(sys.argv[1])
kw = torch.load(sys.argv[2])
out = {}
with torch.no_grad():
    out["keywords"] = model(**kw)
    out["reordered"] = model(attention_mask=kw["attention_mask"], input_ids=kw["input_ids"])
    out["positional first"] = model(kw["input_ids"], attention_mask=kw["attention_mask"])
try:
    model(input_ids=kw["input_ids"])
except sparsecc.InputError as exc:
    out["error"] = str(exc)
torch.save(out, sys.argv[3])
"""


def load_in_a_fresh_process(path, feeds, tmp_path) -> dict:
    """``path`` loaded by a new interpreter that imports only torch and sparsecc, called the three ways of
    `CALLS` on ``feeds`` and once without the mask (the error's text)."""
    torch.save(feeds, tmp_path / "feeds.pt")
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_CALL, str(path), str(tmp_path / "feeds.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=False)


def test_saved_pt2_takes_keywords_in_a_fresh_process(tmp_path):
    model = _model()
    compiled = sparsecc.compile(model, example_kwargs=_feeds(1), backend="reference")
    path = sparsecc.save(compiled, tmp_path / "m.pt2")        # the example it was compiled with
    feeds = _feeds(3)
    out = load_in_a_fresh_process(path, feeds, tmp_path)
    with torch.no_grad():
        want = model(**feeds)["logits"]
    for how in CALLS:
        assert_equivalent(out[how]["logits"], want)
    assert "missing input(s) 'attention_mask'" in out["error"]
    loaded = sparsecc.load(path)
    for call, match in BAD_CALLS:
        with pytest.raises(InputError, match=match):
            call(loaded, feeds)


def test_save_takes_example_kwargs_for_a_model_compiled_without_inputs(tmp_path):
    model = _model()
    compiled = sparsecc.compile(model, backend="reference", validate=False)
    with pytest.raises(InputError, match="compiled without any and never called"):
        sparsecc.save(compiled, tmp_path / "m.pt2")
    loaded = sparsecc.load(sparsecc.save(compiled, tmp_path / "m.pt2", example_kwargs=_feeds(1)))
    feeds = _feeds(2)
    with torch.no_grad():
        assert_equivalent(loaded(**feeds)["logits"], model(**feeds)["logits"])


def test_onnxruntime_engine_takes_other_lengths_and_names_fixed_sizes(tmp_path):
    """compile(backend="onnxruntime") frees the length axes as the model does; a file whose length is fixed
    answers a call at another length with an `InputError` listing its inputs' sizes (not onnxruntime's error)."""
    from sparsecc.runtimes.onnxruntime import engine, writer

    model = _model()
    compiled = sparsecc.compile(model, example_kwargs=_feeds(1), backend="onnxruntime")
    longer = _feeds(2, length=12)
    with torch.no_grad():
        got, want = compiled(**longer)["logits"], model(**longer)["logits"]
    assert_equivalent(got, want)

    call = Call((), _feeds(1))
    exported = writer.write_onnx(sparsecc.compile(model, example_kwargs=_feeds(1)).module, call,
                                 tmp_path / "fixed.onnx", dynamic_axes="batch")
    with torch.no_grad():
        outputs = torch.utils._pytree.tree_flatten(call(model))[1]
    fixed = engine.load(exported.path, exported.input_names, outputs,
                        arrangement=Arrangement.of(model.forward, call))
    with torch.no_grad():
        assert_equivalent(fixed(**_feeds(3))["logits"], model(**_feeds(3))["logits"])
        with pytest.raises(InputError, match=r"takes input_ids \(\w+, 7\).*got input_ids \(2, 12\)"):
            fixed(**longer)


class _TakesExtras(nn.Module):
    """A forward with ``**kwargs``, as transformers models have: ``bias`` binds to it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)

    def forward(self, x, mask=None, **kwargs):
        y = self.fc(x) * mask
        return y + kwargs["bias"] if "bias" in kwargs else y


def test_inputs_that_bind_to_var_keyword_export_and_run_everywhere(tmp_path):
    """An input that binds to ``**kwargs`` gets a name of its own in every torch.export (else the program's
    guards fail when it runs: NameError 'L'): ONNX engine, .pt2 and TVM library all take it by name."""
    model = _TakesExtras().eval()
    synthetic.attach_with_prune(model, {"fc.weight": synthetic.fanin_mask(model.fc.weight, 0.75)})
    example = {"x": torch.randn(2, 16), "mask": torch.ones(2, 32), "bias": torch.randn(2, 32)}
    later = {"bias": torch.randn(3, 32), "x": torch.randn(3, 16), "mask": torch.ones(3, 32)}
    with torch.no_grad():
        want = model(**later)
    engine = sparsecc.compile(model, example_kwargs=example, backend="onnxruntime")
    loaded = sparsecc.load(sparsecc.save(sparsecc.compile(model, example_kwargs=example), tmp_path / "m.pt2"))
    with torch.no_grad():
        for runner in (engine, loaded):
            assert_equivalent(runner(**later), want)
    with pytest.raises(InputError, match="missing input.*'bias'"):
        engine(x=later["x"], mask=later["mask"])
    sparsecc.export_tvm(model, (), tmp_path / "m.so", example_kwargs=example)
    library = sparsecc.load_tvm(tmp_path / "m.so")
    assert library.input_names == ["x", "mask", "bias"]
    reordered = {k: example[k].numpy() for k in ("mask", "bias", "x")}    # a library is specialised on its shapes
    with torch.no_grad():
        assert_equivalent(torch.from_numpy(library(**reordered)), model(**example))
