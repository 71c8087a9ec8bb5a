"""A user's own MLP pruned with torch.nn.utils.prune, inspected, then compiled without example inputs
(validation happens on the first call).

    python examples/prune_mlp.py
"""

import torch
from torch import nn
from torch.nn.utils import prune

import sparsecc
from sparsecc.tooling.synthetic import fanin_mask

model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
prune.custom_from_mask(model[0], "weight", fanin_mask(model[0].weight, sparsity=0.9, ablate=0.2))

print(sparsecc.inspect(model), end="\n\n")
compiled = sparsecc.compile(model)
y = compiled(torch.randn(4, 256))            # validated against the masked model on this call
print(compiled.report.summary())
