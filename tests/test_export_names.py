"""Exports that speak the model's language: inputs named after ``forward``'s parameters or the keyword inputs,
outputs after their paths (``logits``), batch and sequence axes free (checked at other sizes before the file
is written), keyword example inputs, and Triton configs with those names and ``-1`` dims. Small Hugging Face
models from configs with random weights (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from torch import nn

import sparsecc
from sparsecc import InputError
from sparsecc.runtimes.onnxruntime.engine import session
from sparsecc.tooling import synthetic

pytestmark = pytest.mark.slow     # whole models exported and run: `make test` runs it, `make check` does not

transformers = pytest.importorskip("transformers")
VOCAB = 96


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(cfg).eval()
    synthetic.attach_with_prune(model, synthetic.structured_masks(
        model, "fanin", 0.75, include=lambda fqn, kind: fqn.startswith("bert.encoder.")))
    return model


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    synthetic.attach_with_prune(model, synthetic.structured_masks(
        model, "fanin", 0.75, include=lambda fqn, kind: fqn.startswith("transformer.h.")))
    return model


def _ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))


def _check_runs_like_the_model(path: Path, model: nn.Module, names: list[str], output: str) -> None:
    sess = session(path, 1)
    assert [i.name for i in sess.get_inputs()] == names
    assert [o.name for o in sess.get_outputs()][0] == output
    for batch, length in ((1, 9), (3, 40)):          # neither the example's batch nor its length
        ids = _ids(batch, length)
        feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if batch > 1:
            feeds["attention_mask"][0, length // 2:] = 0          # padding in one sequence
        feeds = {n: feeds[n] for n in names}
        with torch.no_grad():
            expected = getattr(model(**feeds), output)
        got = torch.from_numpy(sess.run([output], {n: t.numpy() for n, t in feeds.items()})[0])
        assert got.shape == expected.shape
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("build,keys,output", [(_bert, ("input_ids", "attention_mask"), "logits"),
                                               (_gpt2, ("input_ids", "attention_mask"), "logits")])
def test_keyword_inputs_named_and_free_in_batch_and_length(tmp_path, build, keys, output):
    model = build()
    ids = _ids(1, 16)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    exported = sparsecc.export_onnx(model, (), tmp_path / "m.onnx", example_kwargs={k: kwargs[k] for k in keys})
    assert exported.input_names == list(keys)
    assert exported.output_names[0] == output
    for value in session(exported.path, 1).get_inputs():
        assert all(isinstance(d, str) for d in value.shape), value.shape      # batch and length symbolic
    _check_runs_like_the_model(exported.path, model, list(keys), output)


def test_a_half_precision_model_with_token_inputs_keeps_its_free_length(tmp_path):
    """An fp16 decoder takes integer ids, so nothing in its inputs says fp16: the free-axes probe checks the file
    at its outputs' dtype's tolerance (it used float32's, refused the length and left only the batch free)."""
    import warnings

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval().half()          # cast before masking: the weights stay fp16
    synthetic.attach_with_prune(model, synthetic.structured_masks(
        model, "fanin", 0.75, include=lambda fqn, kind: fqn.startswith("transformer.h.")))
    with warnings.catch_warnings():
        warnings.simplefilter("error", sparsecc.SparseccWarning)
        exported = sparsecc.export_onnx(model, (), tmp_path / "m.onnx", example_kwargs={"input_ids": _ids(1, 16)})
    sess = session(exported.path, 1)
    (value,) = sess.get_inputs()
    assert all(isinstance(d, str) for d in value.shape), value.shape          # batch and length symbolic
    for batch, length in ((1, 9), (3, 40)):
        ids = _ids(batch, length)
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        got = torch.from_numpy(sess.run(["logits"], {"input_ids": ids.numpy()})[0])
        assert got.shape == expected.shape
        assert got.dtype == expected.dtype == torch.float16
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


def test_positional_inputs_take_forwards_parameter_names_and_static_pins_the_length(tmp_path):
    model = _bert()
    ids = _ids(1, 16)
    exported = sparsecc.export_onnx(model, (ids, torch.ones_like(ids)), tmp_path / "m.onnx", dynamic_axes="batch")
    assert exported.input_names == ["input_ids", "attention_mask"]
    shapes = [i.shape for i in session(exported.path, 1).get_inputs()]
    assert all(isinstance(s[0], str) and s[1] == 16 for s in shapes), shapes


@pytest.mark.parametrize("build,logits_dims", [(_bert, [2]), (_gpt2, [-1, VOCAB])])
def test_triton_config_carries_the_names_and_free_dims(tmp_path, build, logits_dims):
    root = Path(importlib.util.find_spec("tritonclient").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", root / "grpc" / "model_config_pb2.py")
    pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb2)
    model = build()
    ids = _ids(1, 16)
    written = sparsecc.export_triton(model, (), tmp_path / "repo", "m", max_batch_size=4, threads=1,
                                     example_kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    config = text_format.Parse(written.models["onnx"].config.read_text(), pb2.ModelConfig())
    assert [(t.name, list(t.dims)) for t in config.input] == [("input_ids", [-1]), ("attention_mask", [-1])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", logits_dims)]
    sess = session(written.models["onnx"].file, 1)
    x = _ids(4, 23)
    got = sess.run(["logits"], {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy())})[0]
    with torch.no_grad():
        expected = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    got = torch.from_numpy(got)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_tuple_outputs_are_numbered(tmp_path):
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, features):
            y = self.fc(features)
            return y, y.sum(-1)

    exported = sparsecc.export_onnx(Two().eval(), torch.randn(1, 5, 8), tmp_path / "t.onnx")
    assert exported.input_names == ["features"] and exported.output_names == ["output_0", "output_1"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(example_kwargs=[1, 2]), "example_kwargs is a list"),
    (dict(dynamic_axes="everything"), "dynamic_axes='everything'"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        sparsecc.export_onnx(nn.Linear(4, 4), torch.randn(1, 4), tmp_path / "x.onnx", **kwargs)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("build", [_bert, _gpt2])
def test_pt2_and_engine_of_a_hugging_face_model_take_its_keywords(tmp_path, build):
    """The `.pt2` (loaded by a fresh interpreter) and the onnxruntime engine are called as the model is:
    keywords in any order, the ids by position; a missing mask is an `InputError` naming it."""
    from tests.test_keyword_calls import CALLS, load_in_a_fresh_process

    model = build()
    ids = _ids(1, 12)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ids = _ids(3, 12)                                    # another batch at the example's length
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    feeds["attention_mask"][0, 6:] = 0
    with torch.no_grad():
        want = model(**feeds).logits
    compiled = sparsecc.compile(model, example_kwargs=example, backend="reference")
    out = load_in_a_fresh_process(sparsecc.save(compiled, tmp_path / "m.pt2"), feeds, tmp_path)
    engine = sparsecc.compile(model, example_kwargs=example, backend="onnxruntime")
    assert all(s.ok for s in engine.report.end_to_end)
    for how, call in CALLS.items():
        torch.testing.assert_close(out[how]["logits"], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        with torch.no_grad():
            got = call(engine, feeds).logits
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert "missing input(s) 'attention_mask'" in out["error"]
    with pytest.raises(InputError, match="missing input.*'input_ids'; input.*'input_idz' were not in the example call"):
        engine(input_idz=ids, attention_mask=feeds["attention_mask"])


_QUIET_EXPORT = """
import sys, torch, transformers, sparsecc
sys.path.insert(0, {root!r})
from tests.test_export_names import _bert, _ids
model = _bert()
ids = _ids(1, 9)
sparsecc.export_onnx(model, (), {path!r}, example_kwargs={{"input_ids": ids, "attention_mask": torch.ones_like(ids)}})
sparsecc.export_triton(model, (), {repo!r}, "bert", example_kwargs={{"input_ids": ids}})
print("DONE")
"""


def test_exports_print_nothing_in_a_plain_process(tmp_path):
    """No stray output from the export path (onnxscript's "Evaluation failed" constant-folding lines, the
    exporter's progress): run where nothing captures logging, as a user's script runs."""
    import subprocess
    import sys

    script = _QUIET_EXPORT.format(root=str(Path(__file__).resolve().parents[1]), path=str(tmp_path / "bert.onnx"),
                                  repo=str(tmp_path / "repo"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "DONE\n", done.stdout[-2000:]
    assert "Evaluation failed" not in done.stderr and "WARNING" not in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "bert.onnx").is_file() and (tmp_path / "repo" / "bert" / "config.pbtxt").is_file()
