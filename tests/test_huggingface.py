"""Hugging Face models as users call them: keyword inputs, ``ModelOutput`` and KV caches in the outputs, the
compiled model's ``config`` and ``generate``, GPT-2's transposed ``Conv1D``. Small models from configs with
random weights (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import InputError
from sparsecc.compiler import precision
from sparsecc.compiler.validation import flatten
from sparsecc.core.errors import EquivalenceError, MaskError
from sparsecc.tooling import hf, synthetic
from tests.conftest import assert_equivalent

pytestmark = pytest.mark.slow    # whole models: `make test` runs it, `make check` does not

transformers = pytest.importorskip("transformers")

VOCAB = 96


def assert_same_output(actual, expected) -> None:
    """Same structure and types all the way down (ModelOutput, cache objects), tensors equivalent."""
    assert type(actual) is type(expected), f"{type(actual).__name__} != {type(expected).__name__}"
    got, got_spec, got_names = flatten(actual)
    want, want_spec, want_names = flatten(expected)
    assert got_names == want_names
    assert got_spec == want_spec
    tensors = 0
    for a, e, name in zip(got, want, want_names):
        if isinstance(e, torch.Tensor):
            assert_equivalent(a, e)
            tensors += 1
        else:
            assert type(a) is type(e), name
    assert tensors, "no tensor was compared"


def bert(masks: str = "fanin") -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    synthetic.attach_with_prune(model, synthetic.structured_masks(
        model, masks, 0.75, include=lambda fqn, kind: fqn.startswith("encoder.")))
    return model


def llama(structure: str = "fanin") -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    synthetic.attach_with_prune(model, synthetic.structured_masks(
        model, structure, 0.7, include=lambda fqn, kind: fqn.startswith("model.layers.")))
    return model


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tokens(n: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, n))


@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_bert_keyword_inputs_and_model_output(structure):
    model = bert(structure)
    ids = tokens(12, batch=2)
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0                                       # padding in the second sequence
    kwargs = dict(input_ids=ids, attention_mask=attention, token_type_ids=torch.zeros_like(ids))
    compiled = sparsecc.compile(model, example_kwargs=kwargs)
    assert len(compiled.report.condensed) == 12
    assert compiled.report.validated
    for call in (kwargs, dict(input_ids=tokens(7), attention_mask=torch.ones(1, 7, dtype=torch.long))):
        with torch.no_grad():
            assert_same_output(compiled(**call), model(**call))
    with torch.no_grad():                                       # positional and keyword mixed, as the user may
        assert_same_output(compiled(ids, attention_mask=attention), model(ids, attention_mask=attention))


@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_causal_lm_kv_cache_and_greedy_generate(structure):
    model = llama(structure)
    prompt = tokens(10)
    compiled = sparsecc.compile(model, example_kwargs=dict(input_ids=prompt))
    assert len(compiled.report.condensed) == 14
    expected_op = "nm_linear" if structure == "2:4" else "condensed_linear"
    assert {lay.action for lay in compiled.report.condensed} == {expected_op}
    with torch.no_grad():
        mine, theirs = compiled(input_ids=prompt), model(input_ids=prompt)
        assert_same_output(mine, theirs)
        assert type(hf.cache_of(mine)).__name__ == "DynamicCache"
        step = theirs.logits[:, -1:].argmax(-1)
        # one decode step on each side's own cache: the cache the compiled model returned is usable
        name = hf.cache_keyword(model)
        assert_same_output(compiled(input_ids=step, **{name: hf.cache_of(mine)}),
                           model(input_ids=step, **{name: hf.cache_of(theirs)}))
    want = model.generate(prompt, max_new_tokens=12, do_sample=False)
    got = compiled.generate(prompt, max_new_tokens=12, do_sample=False)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want)
    # the model object's attributes, as on torch.compile's wrapper
    assert compiled.config is compiled.module.config
    assert compiled.config.to_dict() == model.config.to_dict()
    assert compiled.generation_config.to_dict() == model.generation_config.to_dict()
    assert compiled.get_input_embeddings().weight.shape == model.get_input_embeddings().weight.shape
    with pytest.raises(AttributeError, match="no_such_attribute"):
        compiled.no_such_attribute


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_half_precision_decoder_runs_compiled_kernels_and_decodes_like_the_user_model(dtype, structure):
    """A bf16 / fp16 decoder runs its condensed layers on the TVM kernels in its own dtype (or the dense op
    where that measured faster), validates, and greedy-decodes the user's tokens (exact, or through a near-tie
    its logits' error explains: `hf.greedy_agreement`)."""
    torch.manual_seed(0)
    model = llama(structure).to(dtype)
    prompt = tokens(10)
    compiled = sparsecc.compile(model, example_kwargs=dict(input_ids=prompt))
    assert compiled.report.validated
    assert {lay.runtime for lay in compiled.report.condensed} <= {"tvm", "tvm+dense"}, \
        {lay.runtime for lay in compiled.report.condensed}
    with torch.no_grad():
        mine, theirs = compiled(input_ids=prompt), model(input_ids=prompt)
    assert mine.logits.shape == theirs.logits.shape and mine.logits.dtype == theirs.logits.dtype == dtype
    assert_equivalent(mine.logits, theirs.logits)
    want, got = hf.decode(model, prompt, 16), hf.decode(compiled, prompt, 16)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert hf.greedy_agreement(model, compiled, prompt, want, got) == ""


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_precision_decoder_keeps_its_cache_in_bf16_and_decodes_like_the_fp32_model(arch):
    """``precision="bf16"`` on an fp32 decoder: the logits come back in float32, the KV cache it reads back
    stays as computed, bf16 where autocast computed it (converting it would copy all of it on every step),
    validation compares the cache by value, and greedy decoding (``generate`` and one call per token) follows
    the user's fp32 model."""
    torch.manual_seed(0)
    model = llama("2:4") if arch == "llama" else gpt2()
    if arch == "gpt2":
        synthetic.attach_with_prune(model, synthetic.structured_masks(
            model, "fanin", 0.7, include=lambda fqn, kind: fqn.startswith("transformer.h.")))
    prompt = tokens(10)
    compiled = sparsecc.compile(model, example_kwargs=dict(input_ids=prompt), precision="bf16")
    assert compiled.report.validated
    with torch.no_grad():
        mine, theirs = compiled(input_ids=prompt), model(input_ids=prompt)
    assert mine.logits.shape == theirs.logits.shape and mine.logits.dtype == theirs.logits.dtype == torch.float32
    scale = float(theirs.logits.abs().max())
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=0.0, atol=precision.TOLERANCE * scale)
    cache, expected = flatten(hf.cache_of(mine))[0], flatten(hf.cache_of(theirs))[0]
    held = [(a, e) for a, e in zip(cache, expected) if isinstance(e, torch.Tensor) and e.is_floating_point()]
    # as computed: bf16 out of the projections (values), float32 where an fp32 op followed (keys after RoPE)
    assert held and all(e.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float32) for a, e in held)
    assert any(a.dtype == torch.bfloat16 for a, _ in held)
    for a, e in held:
        assert a.shape == e.shape
        torch.testing.assert_close(a.float(), e, rtol=0.0, atol=precision.TOLERANCE * float(e.abs().max()))
    want, got = hf.decode(model, prompt, 12), hf.decode(compiled, prompt, 12)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert hf.greedy_agreement(model, compiled, prompt, want, got) == ""
    generated = compiled.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(generated[:, prompt.shape[1]:], got)


def test_greedy_agreement_refuses_a_model_that_decodes_otherwise():
    model = llama()
    prompt = tokens(8)
    compiled = sparsecc.compile(model, example_kwargs=dict(input_ids=prompt))
    for layer in compiled.module.model.layers:        # wrong weights: other tokens, not a near-tie
        with torch.no_grad():
            layer.mlp.down_proj.values.mul_(-3.0)
    want, got = hf.decode(model, prompt, 12), hf.decode(compiled, prompt, 12)
    assert not torch.equal(want, got)
    assert "greedy tokens differ at step" in hf.greedy_agreement(model, compiled, prompt, want, got)
    assert hf.greedy_agreement(model, model, prompt, want, want) == ""


def test_validation_compares_the_kv_cache():
    """A compiled model whose cache differs from the user's fails validation, naming the cache entry."""
    model = llama()
    prompt = tokens(6)
    compiled = sparsecc.compile(model, example_kwargs=dict(input_ids=prompt))
    for layer in compiled.module.model.layers:        # the value projections run on other weights
        with torch.no_grad():
            layer.self_attn.v_proj.values.mul_(2.0)
    result = sparsecc.validate(model, compiled, (), dict(input_ids=prompt))
    assert not result.ok
    failed = [s.what for s in result.end_to_end if not s.ok]
    assert any("layers[0].values" in what for what in failed), failed


def test_gpt2_conv1d_prune_hooks_condensed_like_linear():
    model = gpt2()
    masks = synthetic.fanin_masks(model, 0.75, include=lambda fqn, kind: fqn.startswith("transformer.h."))
    assert masks["transformer.h.0.mlp.c_fc.weight"].shape == model.transformer.h[0].mlp.c_fc.weight.shape
    synthetic.attach_with_prune(model, masks)
    prompt = tokens(9)
    compiled = sparsecc.compile(model, example_kwargs=dict(input_ids=prompt))
    condensed = {lay.name for lay in compiled.report.condensed}
    assert condensed == set(masks)                   # every Conv1D of every block
    assert {lay.structure for lay in compiled.report.condensed} == {"fan-in k=16", "fan-in k=64"}
    assert any("Conv1D" in note for note in compiled.report.notes)
    with torch.no_grad():
        assert_same_output(compiled(input_ids=prompt), model(input_ids=prompt))
    assert torch.equal(compiled.generate(prompt, max_new_tokens=10, do_sample=False),
                       model.generate(prompt, max_new_tokens=10, do_sample=False))


@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_gpt2_sparsify_and_masks_argument_in_conv1d_layout(structure):
    model = gpt2()
    report = sparsecc.sparsify(model, structure, sparsity=0.75, include=lambda f, k: f.startswith("transformer.h."))
    assert len(report.layers) == 8
    masks = {name: m.parametrizations.weight[0].mask for name, m in
             ((n + ".weight", mod) for n, mod in model.named_modules()) if hasattr(m, "parametrizations")}
    prompt = tokens(8)
    compiled = sparsecc.compile(model, example_kwargs=dict(input_ids=prompt))
    assert len(compiled.report.condensed) == 8
    with torch.no_grad():
        assert_same_output(compiled(input_ids=prompt), model(input_ids=prompt))
    plain = gpt2()
    plain.load_state_dict({k.replace(".parametrizations.weight.original", ".weight"): v
                           for k, v in model.state_dict().items() if not k.endswith(".mask")}, strict=False)
    compiled = sparsecc.compile(plain, example_kwargs=dict(input_ids=prompt), masks=masks)
    assert {lay.mask_source for lay in compiled.report.condensed} == {"masks="}
    with torch.no_grad():
        assert_same_output(compiled(input_ids=prompt), model(input_ids=prompt))
    name = "transformer.h.0.attn.c_attn.weight"
    with pytest.raises(MaskError, match=name.replace(".", r"\.") + r".*\(64, 192\)"):
        sparsecc.compile(plain, example_kwargs=dict(input_ids=prompt), masks={name: masks[name].t()})


class Scaled(nn.Module):
    """A traceable model with keyword-only options: fx captures it with the keywords as inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor, gate: torch.Tensor = None, scale: float = 1.0) -> dict:
        h = torch.relu(self.fc1(x))
        if gate is not None:
            h = h * gate
        return {"out": self.fc2(h) * scale, "hidden": [h]}


def test_keyword_inputs_on_a_traced_model():
    model = Scaled().eval()
    synthetic.attach_with_prune(model, synthetic.fanin_masks(model, 0.75))
    x, gate = torch.randn(3, 32), torch.rand(3, 64)
    compiled = sparsecc.compile(model, (x,), example_kwargs=dict(gate=gate))
    assert compiled.report.capture == "torch.fx"
    assert len(compiled.report.condensed) == 2
    with torch.no_grad():
        assert_same_output(compiled(x, gate=gate), model(x, gate=gate))
        y, g = torch.randn(5, 32), torch.rand(5, 64)       # another batch
        assert_same_output(compiled(y, gate=g), model(y, gate=g))


def test_example_kwargs_must_be_a_mapping_and_engines_take_keywords():
    model = bert()
    with pytest.raises(InputError, match="example_kwargs"):
        sparsecc.compile(model, example_kwargs=[tokens(4)])
    ids = tokens(8)
    engine = sparsecc.compile(model, example_kwargs=dict(input_ids=ids, attention_mask=torch.ones_like(ids)),
                              backend="onnxruntime")
    other = tokens(11, batch=2)
    mask = torch.ones_like(other)
    mask[1, 7:] = 0
    with torch.no_grad():
        got, want = engine(attention_mask=mask, input_ids=other), model(input_ids=other, attention_mask=mask)
    assert type(got) is type(want)
    assert got.last_hidden_state.shape == want.last_hidden_state.shape
    assert got.last_hidden_state.dtype == want.last_hidden_state.dtype
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-3, atol=1e-4)
    with pytest.raises(InputError, match="missing input.*attention_mask"):
        engine(input_ids=other)


def test_first_call_with_keywords_is_validated():
    model = bert()
    compiled = sparsecc.compile(model)
    assert not compiled.report.validated
    ids = tokens(6)
    with torch.no_grad():
        assert_same_output(compiled(input_ids=ids), model(input_ids=ids))
    assert compiled.report.validated


def test_first_call_validation_catches_a_wrong_layer():
    model = bert()
    compiled = sparsecc.compile(model)
    with torch.no_grad():
        compiled.module.encoder.layer[0].intermediate.dense.values.mul_(2.0)
    with pytest.raises(EquivalenceError, match=r"last_hidden_state.*FAILED.*intermediate\.dense"):
        compiled(input_ids=tokens(6))


def test_narrowing_reads_torch_exports_graph_where_fx_fails():
    """BERT is not traceable by torch.fx; its MLPs' ablated neurons are still removed (intermediate.dense ->
    GELU -> output.dense), found in torch.export's graph."""
    plain = transformers.BertModel(bert().config).eval()
    masks = synthetic.fanin_masks(plain, 0.75, ablate=0.25, include=lambda fqn, kind: fqn.startswith("encoder."))
    synthetic.attach_with_prune(plain, masks)
    ids = tokens(10)
    compiled = sparsecc.compile(plain, example_kwargs=dict(input_ids=ids))
    assert compiled.report.capture == "module swapping"
    assert [r.producer for r in compiled.report.narrowed] == [f"encoder.layer.{i}.intermediate.dense"
                                                              for i in range(2)]
    assert all(r.after == 96 for r in compiled.report.narrowed)
    assert any("torch.export" in note for note in compiled.report.notes)
    assert compiled.module.encoder.layer[0].output.dense.weight_shape == (64, 96)
    for call in (dict(input_ids=ids), dict(input_ids=tokens(5, batch=3))):
        with torch.no_grad():
            assert_same_output(compiled(**call), plain(**call))


def test_convolutional_model_narrows_and_folds_through_torch_export():
    """Hugging Face's ResNet is not traceable by torch.fx: ablated filters are removed (conv -> BatchNorm -> ReLU
    -> conv) and the BatchNorms folded into the swapped-in condensed convolutions, both guided by torch.export's
    graph; outputs stay the model's."""
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                                    num_labels=5)
    model = transformers.ResNetForImageClassification(cfg).eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.normal_()
    masks = synthetic.fanin_masks(model, 0.75, ablate=0.2, include=lambda f, k: k == "conv2d" and "embedder" not in f)
    synthetic.attach_with_prune(model, masks)
    x = torch.randn(2, 3, 32, 32)
    compiled = sparsecc.compile(model, example_kwargs={"pixel_values": x})
    assert compiled.report.capture == "module swapping"
    assert len(compiled.report.condensed) == len(masks)
    assert [r.producer for r in compiled.report.narrowed] == [f"resnet.encoder.stages.{i}.layers.0.layer.0.convolution"
                                                              for i in range(2)]
    assert len(compiled.report.folded) == len(masks)
    assert all(isinstance(compiled.module.get_submodule(bn), nn.Identity) for bn in compiled.report.folded)
    for pixels in (x, torch.randn(1, 3, 48, 48)):
        with torch.no_grad():
            assert_same_output(compiled(pixel_values=pixels), model(pixel_values=pixels))
