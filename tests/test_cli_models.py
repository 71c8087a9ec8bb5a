"""The command line on the user's own model: a Hugging Face model directory, a torch.export ``.pt2``, a
``torch.save``d module; ``--sparsify``; progress on stderr; the Hugging Face benchmarks' functions."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from sparsecc.runtimes import tuning
from sparsecc.tooling import bench_hf, cli, hf, usermodel
from tests.conftest import assert_equivalent

pytestmark = pytest.mark.slow    # whole models: `make test` runs it, `make check` does not

transformers = pytest.importorskip("transformers")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 32),
                         nn.ReLU(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=1)
    path = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)       # no tokenizer: token ids from the config
    return path


def test_inspect_a_hugging_face_directory_with_sparsify(gpt2_dir, capsys):
    assert cli.main(["inspect", str(gpt2_dir), "--sparsify", "fanin:0.8", "--tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "transformer.h.1.mlp.c_proj.weight" in captured.out and "fan-in k=51" in captured.out
    assert "8/9 layers condensable" in captured.out                  # lm_head stays dense
    assert "loaded GPT2LMHeadModel" in captured.err and "sparsify fanin:0.8: 8 layer(s) masked" in captured.err


def test_bench_a_trained_encoder_directory(tmp_path, capsys):
    assert cli.main(["bench", str(hf.minilm_dir()), "--sparsify", "2:4", "--model-runs", "2", "--threads", "1",
                     "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model.md").read_text().startswith("CPU: ")
    captured = capsys.readouterr()
    assert "36/37 layers condensed (36 nm_linear)" in captured.out
    assert "| BertModel from" in captured.out and "x** |" in captured.out
    assert "compile validate:" in captured.err and "timing dense vs sparsecc" in captured.err


@pytest.mark.slow
def test_bench_encoder_fused_compiles_each_length_with_fuse(monkeypatch):
    """``sparsecc bench --encoder --fuse``: a fused model serves its example's shapes, so each length gets its
    own compile with ``fuse=`` at the bench's thread counts, and is timed against dense."""
    import sparsecc

    fused_at, real = [], sparsecc.compile

    def spy(model, *args, **kwargs):
        compiled = real(model, *args, **kwargs)
        if kwargs.get("fuse"):
            fused_at.append((kwargs["example_kwargs"]["input_ids"].shape[1], kwargs["fuse"],
                             [n for n in compiled.report.notes if n.startswith("fuse at")]))
        return compiled

    monkeypatch.setattr(sparsecc, "compile", spy)
    rows = bench_hf.encoder(runs=2, threads=(1,), lengths=(8, 12), structures=("2:4",), fuse=True)
    assert [(length, fuse) for length, fuse, _ in fused_at] == [(8, (1,)), (12, (1,))]
    assert all(len(notes) == 1 and " ms fused (" in notes[0] for _, _, notes in fused_at), fused_at
    assert len(rows) == 2 and all(r.sparse["call"] > 0 and r.dense["call"] > 0 for r in rows)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("bert")
    transformers.BertModel(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["saved module", "keyword inputs"])
def test_bench_of_your_model_with_peers_writes_their_rows(kind, tmp_path, bert_dir, capsys):
    """``sparsecc bench MODEL --peers``: onnxruntime (dense, condensed) and OpenVINO (f32, its default precision)
    on the same model and input (keyword inputs by name: a Hugging Face encoder's ``input_ids``), each output
    checked against the dense model before it is timed; the table and OUT/model.md, .json carry every peer."""
    if kind == "saved module":
        torch.save(small_net(), tmp_path / "net.pt")
        args = [str(tmp_path / "net.pt"), "--sparsify", "fanin:0.75", "--input-shape", "1,3,16,16"]
    else:
        args = [str(bert_dir), "--sparsify", "fanin:0.8", "--tokens", "12"]
    out = tmp_path / "out"
    assert cli.main(["bench", *args, "--peers", "--model-runs", "2", "--threads", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    labels = ("onnxruntime dense (fp32)", "onnxruntime condensed (fp32)", "OpenVINO f32 (fp32)", "OpenVINO default")
    assert all(label in table for label in labels), table
    rows = json.loads((out / "model.json").read_text())
    assert [r["threads"] for r in rows] == [1]
    timed = rows[0]["peers"]
    assert {"onnxruntime dense (fp32)", "onnxruntime condensed (fp32)", "OpenVINO f32 (fp32)"} <= set(timed), rows
    assert all(t > 0 for t in timed.values()) and rows[0]["sparse"]["call"] > 0
    assert not any(label.startswith("onnxruntime") for label in rows[0]["peers_invalid"]), rows[0]["peers_invalid"]
    assert (out / "model.md").read_text().startswith("CPU: ")


def test_bench_of_your_model_with_fuse_reports_each_thread_count(tmp_path, capsys):
    """``sparsecc bench MODEL --fuse``: the model is compiled with ``fuse=`` at the bench's thread counts, and
    the report printed before the table says what each fused graph measured."""
    torch.save(small_net(), tmp_path / "net.pt")
    args = [str(tmp_path / "net.pt"), "--sparsify", "fanin:0.75", "--input-shape", "1,3,16,16", "--fuse"]
    assert cli.main(["bench", *args, "--model-runs", "2", "--threads", "1", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "fuse at 1 thread(s): " in printed and " ms fused (" in printed, printed
    assert "| model | threads | dense | sparsecc (fused) | speed-up |" in (tmp_path / "out" / "model.md").read_text()
    assert json.loads((tmp_path / "out" / "model.json").read_text())[0]["sparse"]["call"] > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_half_precision_saved_module_gets_inputs_in_its_dtype(dtype, tmp_path):
    """``--input-shape`` (and the input read from the first layer) is made in the model's own dtype: a saved fp16
    or bf16 module benches as the user runs it instead of failing on a float32 input."""
    torch.save(small_net().to(dtype), tmp_path / "net.pt")
    for input_shape in ((1, 3, 16, 16), None):
        (x,) = usermodel.load(str(tmp_path / "net.pt"), input_shape).call.args
        assert x.dtype == dtype
    args = [str(tmp_path / "net.pt"), "--sparsify", "fanin:0.75", "--input-shape", "1,3,16,16"]
    assert cli.main(["bench", *args, "--model-runs", "2", "--threads", "1", "--out", str(tmp_path / "out")]) == 0
    (row,) = json.loads((tmp_path / "out" / "model.json").read_text())
    assert row["sparse"]["call"] > 0 and row["dense"]["call"] > 0


def test_bench_peers_of_a_model_onnx_cannot_hold_say_why(tmp_path, gpt2_dir, capsys):
    """A decoder answering a KV cache has no ONNX file: its peers are reported not run, with the reason, and
    dense vs sparsecc is still timed."""
    out = tmp_path / "out"
    assert cli.main(["bench", str(gpt2_dir), "--sparsify", "fanin:0.8", "--tokens", "12", "--peers",
                     "--model-runs", "2", "--threads", "1", "--out", str(out)]) == 0
    assert "not run: no ONNX export of this model" in capsys.readouterr().out
    (row,) = json.loads((out / "model.json").read_text())
    assert row["sparse"]["call"] > 0 and row["dense"]["call"] > 0 and not row["peers"]
    assert set(row["peers_invalid"]) >= {"onnxruntime dense (fp32)", "onnxruntime condensed (fp32)"}


def test_pt2_program_is_read_with_its_layers(tmp_path, capsys):
    program = torch.export.export(small_net(), (torch.randn(2, 3, 16, 16),))
    torch.export.save(program, tmp_path / "net.pt2")
    assert cli.main(["inspect", str(tmp_path / "net.pt2"), "--sparsify", "fanin:0.75"]) == 0
    out = capsys.readouterr().out
    assert "3/3 layers condensable" in out and "fan-in k=7" in out and "fan-in k=512" in out


def test_pt2_program_compiles_to_its_outputs(tmp_path):
    """The modules modularize gives back hold the program's tensors: the compiled program equals the program."""
    import sparsecc

    program = torch.export.export(small_net(), (torch.randn(2, 3, 16, 16),))
    torch.export.save(program, tmp_path / "net.pt2")
    loaded = usermodel.load(str(tmp_path / "net.pt2"))
    kinds = sorted(type(m).__name__ for m in loaded.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert kinds == ["Conv2d", "Linear", "Linear"]
    assert usermodel.sparsify(loaded.model, "fanin:0.75") == 3
    compiled = sparsecc.compile(loaded.model, loaded.call.args)
    assert len(compiled.report.condensed) == 3
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_equivalent(compiled(x), loaded.model(x))


def test_export_a_saved_module_to_onnx(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    model = small_net()
    torch.save(model, tmp_path / "net.pt")
    out = tmp_path / "net.onnx"
    assert cli.main(["export", str(tmp_path / "net.pt"), str(out), "--sparsify", "fanin:0.75",
                     "--input-shape", "1,3,16,16"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    mine = copy.deepcopy(model)                     # the same magnitude masks, attached the same way
    usermodel.sparsify(mine, "fanin:0.75")
    x = torch.randn(3, 3, 16, 16)
    session = ort.InferenceSession(str(out))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert_equivalent(got, mine(x))


def test_user_model_errors(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing.pt")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    torch.save(small_net().state_dict(), tmp_path / "weights.pt")
    assert cli.main(["inspect", str(tmp_path / "weights.pt")]) == 2
    assert "not an nn.Module" in capsys.readouterr().err
    torch.save(small_net(), tmp_path / "net.pt")
    assert cli.main(["inspect", str(tmp_path / "net.pt"), "--sparsify", "fanin:9"]) == 2
    assert "--sparsify 'fanin:9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--sparsify", "2:4"])
    assert "apply to your MODEL" in capsys.readouterr().err


def test_first_layer_gives_the_input():
    loaded = usermodel.Loaded(small_net(), usermodel._first_layer_call(small_net(), 8), "net")
    assert loaded.call.args[0].shape == (1, 3, 224, 224)
    embedding = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 4))
    ids = usermodel._first_layer_call(embedding, 8).args[0]
    assert ids.dtype == torch.int64 and ids.shape == (1, 8) and int(ids.max()) < 50


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llm_decode_benchmark_checks_tokens_and_reports_speeds(dtype):
    """Greedy tokens of the compiled decoder equal the dense model's in the same dtype (bf16 runs its condensed
    layers on the reference runtime's measured choice) before any speed is reported."""
    config = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128)
    rows = bench_hf.llm(runs=1, threads=(1,), prompt=8, new_tokens=6, masks=("2:4", "70% per-row"), config=config,
                        dtype=dtype)
    assert [(r.case, r.threads) for r in rows] == [(f"2:4, {dtype}", 1), (f"70% per-row, {dtype}", 1)]
    for r in rows:
        assert r.invalid == ""
        assert set(r.dense) == set(r.sparse) == {"prefill", "decode"}
        assert all(v > 0 for v in [*r.dense.values(), *r.sparse.values()])
    table = bench_hf.llm_table(rows)
    assert f"| 2:4, {dtype} | 1 |" in table and "decode tok/s" in table


@pytest.mark.measured_choice
def test_choices_of_models_larger_than_the_cache_are_measured_cold(tmp_path, monkeypatch):
    import sparsecc
    from sparsecc.compiler import autotune
    from sparsecc.core.layers import CondensedLayer
    from sparsecc.tooling import synthetic

    model = nn.Sequential(nn.Linear(64, 64))
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.7))
    compiled = sparsecc.compile(model, torch.randn(1, 64))
    layer = next(m for m in compiled.module.modules() if isinstance(m, CondensedLayer))
    assert not tuning.streaming(layer.values)                     # 10 KiB: fits in any cache
    monkeypatch.setattr(tuning, "llc_bytes", lambda: 1024)
    assert autotune.stream_if_large(compiled.module)
    assert tuning.streaming(layer.values)
    cache = tuning.TuningCache({"test": 1}, tmp_path)
    choice = tuning.choose(cache, ("sig",), 1, lambda: None, lambda: None, cold=True)
    assert choice.cold and "cold cache" in choice.describe()
    assert tuning.choose(cache, ("sig",), 1, lambda: None, lambda: None, cold=False).cold is False
