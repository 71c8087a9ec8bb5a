"""Compile an SRigL-style 90% constant fan-in ViT-B/16 (random weights) and compare it with the original.

    python examples/compile_vit.py
"""

import torch

import sparsecc
from sparsecc.tooling.demo import sparse_model

model = sparse_model("vit_b_16", sparsity=0.9, ablate=0.05)   # masks attached as torch.nn.utils.prune hooks
x = torch.randn(1, 3, 224, 224)

compiled = sparsecc.compile(model, example_inputs=(x,))
print(compiled.report)

with torch.no_grad():
    y, expected = compiled(x), model(x)
print("max abs difference vs the masked model:", float((y - expected).abs().max()))
