"""Tensors with several uses (tied parameters, a module called twice, a masked and a plain use of one
tensor): every use keeps its own effective weight, masked uses are condensed, plain uses stay as they were,
and validation compares with the user's model as run, so a rebuild that goes wrong cannot pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

import sparsecc
from sparsecc import EquivalenceError, dynamo
from sparsecc.capture import masks as masks_pass
from sparsecc.tooling.synthetic import fanin_mask
from tests.conftest import assert_equivalent


class TiedLM(nn.Module):
    """An LM head tied to the embedding (GPT-2, OPT, BERT-MLM, T5 ...)."""

    def __init__(self, vocab=100, d=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


class FunctionalTied(nn.Module):
    """The head is a functional use of the embedding's tensor; a masked Linear shares it too."""

    def __init__(self, vocab=64, d=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, vocab)
        self.proj.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.proj(h) + F.linear(h, self.emb.weight)


class CalledTwice(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


def _ids():
    return torch.randint(0, 64, (2, 7))


def check(model, compiled, *inputs):
    with torch.no_grad():
        expected = model(*inputs)
        actual = compiled(*inputs)
    assert_equivalent(actual, expected)


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_sparsified_tied_head_keeps_the_embedding_dense(backend):
    model = TiedLM().eval()
    sparsecc.sparsify(model, "fanin", sparsity=0.75)
    compiled = sparsecc.compile(model, (_ids(),), backend=backend)
    check(model, compiled, _ids())
    head = next(lay for lay in compiled.report.layers if lay.name == "head.weight")
    assert head.action == "condensed_linear"
    assert "tensor shared with emb.weight" in head.reason
    assert torch.equal(compiled.module.emb.weight, model.emb.weight), "the embedding lost its unmasked values"


def test_prune_hook_on_tied_head():
    model = TiedLM().eval()
    prune.custom_from_mask(model.head, "weight", fanin_mask(model.head.weight, 0.8))
    compiled = sparsecc.compile(model, (_ids(),))
    assert compiled.report.rewrites == {"condensed_linear": 1}
    check(model, compiled, _ids())
    assert model.emb.weight is model.head.weight_orig, "the user's model was modified"


def test_explicit_mask_on_tied_weight_masks_only_that_use():
    model = TiedLM().eval()
    masks = {"head.weight": fanin_mask(model.head.weight, 0.75)}
    compiled = sparsecc.compile(model, (_ids(),), masks=masks)
    assert torch.equal(sparsecc.masked_reference(model, masks).emb.weight, model.emb.weight)
    prune.custom_from_mask(model.head, "weight", masks["head.weight"])    # what the user means by masks=
    check(model, compiled, _ids())


def test_masked_and_plain_use_of_one_tensor_with_functional_use():
    model = FunctionalTied().eval()
    parametrize.register_parametrization(model.proj, "weight", FakeSparsity(fanin_mask(model.proj.weight, 0.75)))
    compiled = sparsecc.compile(model, (_ids(),))
    assert compiled.report.rewrites == {"condensed_linear": 1}
    check(model, compiled, _ids())


def test_two_linears_tied_with_the_same_zeros_are_both_condensed():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).eval()
    with torch.no_grad():
        model[0].weight.mul_(fanin_mask(model[0].weight, 0.75))
    model[2].weight = model[0].weight
    compiled = sparsecc.compile(model, (torch.randn(3, 32),))
    assert compiled.report.rewrites == {"condensed_linear": 2}
    reasons = {lay.name: lay.reason for lay in compiled.report.layers}
    assert "tensor shared with 2.weight" in reasons["0.weight"]
    assert "tensor shared with 0.weight" in reasons["2.weight"]
    check(model, compiled, torch.randn(4, 32))


@pytest.mark.parametrize("backend", ["reference", "tvm"])
def test_module_called_twice(backend):
    model = CalledTwice().eval()
    prune.custom_from_mask(model.a, "weight", fanin_mask(model.a.weight, 0.75))
    compiled = sparsecc.compile(model, (torch.randn(1, 32),), backend=backend)
    assert compiled.report.rewrites == {"condensed_linear": 1}   # one module, condensed once, called twice
    check(model, compiled, torch.randn(5, 32))


def test_wrong_rebuild_is_caught_and_named(monkeypatch):
    """Without untying, baking the head's mask also masks the embedding: validation against the user's model
    must refuse it and name where the rebuilt reference differs."""
    monkeypatch.setattr(masks_pass, "_untie", lambda model, slots: {})
    model = TiedLM().eval()
    sparsecc.sparsify(model, "fanin", sparsity=0.75)
    with pytest.raises(EquivalenceError, match=r"rebuilt already differs from your model at emb"):
        sparsecc.compile(model, (_ids(),), backend="reference")


def test_validate_compares_with_the_model_as_run():
    model = TiedLM().eval()
    sparsecc.sparsify(model, "fanin", sparsity=0.75)
    compiled = sparsecc.compile(model, (_ids(),), backend="reference")
    assert sparsecc.validate(model, compiled, (_ids(),)).ok
    other = TiedLM().eval()
    sparsecc.sparsify(other, "fanin", sparsity=0.75)
    result = sparsecc.validate(other, compiled, (_ids(),))
    assert not result.ok and "differs from the model as you run it" in result.message()


def test_first_call_validation_against_the_model_as_run(monkeypatch):
    monkeypatch.setattr(masks_pass, "_untie", lambda model, slots: {})
    model = TiedLM().eval()
    sparsecc.sparsify(model, "fanin", sparsity=0.75)
    compiled = sparsecc.compile(model, backend="reference")
    with pytest.raises(EquivalenceError, match="rebuilt already differs"):
        compiled(_ids())


class SelfNamedS(nn.Module):
    """A forward whose first argument is not called ``self``: dynamo names the module's state after it."""

    def __init__(s, d=32):
        super().__init__()
        s.fc = nn.Linear(d, d)

    def forward(s, x):
        return torch.relu(s.fc(x))


@pytest.mark.parametrize("inductor", [False, True])
@pytest.mark.parametrize("how", ["sparsify", "prune"])
def test_torch_compile_tied_head(how, inductor):
    torch._dynamo.reset()
    model = TiedLM().eval()
    if how == "sparsify":
        sparsecc.sparsify(model, "fanin", sparsity=0.75)
    else:
        prune.custom_from_mask(model.head, "weight", fanin_mask(model.head.weight, 0.8))
    compiled = torch.compile(model, backend=dynamo.backend_with(inductor=inductor))
    check(model, compiled, _ids())
    report = dynamo.last_report()
    assert report.rewrites == {"condensed_linear": 2 if how == "sparsify" else 1}
    torch._dynamo.reset()


def test_torch_compile_lifts_state_whatever_the_first_argument_is_called():
    torch._dynamo.reset()
    model = SelfNamedS().eval()
    prune.custom_from_mask(model.fc, "weight", fanin_mask(model.fc.weight, 0.75))
    compiled = torch.compile(model, backend=dynamo.backend_with(inductor=False))
    check(model, compiled, torch.randn(3, 32))
    assert dynamo.last_report().rewrites == {"condensed_linear": 1}
    torch._dynamo.reset()
