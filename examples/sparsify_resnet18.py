"""From a dense model to a narrower, condensed one and a PyTorch-free library: sparsify ResNet-18 with
constant fan-in (ERK densities, 30% of neurons ablated), compile it with narrow=True, export it with TVM.

    python examples/sparsify_resnet18.py
"""

import torch
import torchvision

import sparsecc
from sparsecc.tooling.synthetic import all_but_stem

model = torchvision.models.resnet18(weights=None).eval()
print(sparsecc.sparsify(model, "fanin", sparsity=0.9, distribution="erk", ablate=0.3, include=all_but_stem))
# ... fine-tune here: the masks are parametrizations, so the optimiser only moves the kept weights ...

x = torch.randn(1, 3, 224, 224)
compiled = sparsecc.compile(model, x, narrow=True)      # validated against the masked model
print(compiled.report)

library = sparsecc.export_tvm(compiled, x, "resnet18_sparse.so")
print(f"wrote {library.path}; run it without torch: python runtimes/tvm/runner.py {library.path}")
