"""The main job on a built-in example: an SRigL-style sparse torchvision model, compiled, validated, timed."""

from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn

import sparsecc
from sparsecc import synthetic
from sparsecc.timing import medians

#: Model name -> (constructor taking the input image size, which weights SRigL would sparsify). ResNets take
#: any size; ViT's position embedding is built for one (a multiple of its 16-pixel patches).
MODELS: dict[str, tuple[Callable[[int], nn.Module], synthetic.Selector]] = {
    "vit_b_16": (lambda size: torchvision.models.vit_b_16(weights=None, image_size=size), synthetic.vit_encoder),
    "resnet18": (lambda size: torchvision.models.resnet18(weights=None), synthetic.all_but_stem),
    "resnet50": (lambda size: torchvision.models.resnet50(weights=None), synthetic.all_but_stem),
}


def build(name: str, seed: int = 0, image_size: int = 224) -> nn.Module:
    """A torchvision model with random weights for ``image_size`` x ``image_size`` inputs, in eval mode."""
    torch.manual_seed(seed)
    model = MODELS[name][0](image_size).eval()
    for mod in model.modules():   # torchvision zero-initialises ViT's head: give it weights worth checking
        if isinstance(mod, nn.Linear) and not bool(mod.weight.any()):
            nn.init.normal_(mod.weight, std=0.02)
    return model


def sparse_model(name: str, sparsity: float, ablate: float, seed: int = 0, structure: str = "fanin",
                 image_size: int = 224) -> nn.Module:
    """A torchvision model with random weights and masks attached as prune hooks: constant fan-in (SRigL,
    ``sparsity`` and ``ablate`` apply) or ``"2:4"`` along the input dimension."""
    model = build(name, seed, image_size)
    masks = synthetic.structured_masks(model, structure, sparsity, ablate, MODELS[name][1], seed)
    return synthetic.attach_with_prune(model, masks)


def run(name: str = "vit_b_16", sparsity: float = 0.9, ablate: float = 0.05, backend: str = "auto",
        runs: int = 10, threads: int = 1, autotune: bool = False) -> sparsecc.CompiledModel:
    torch.set_num_threads(threads)
    model = sparse_model(name, sparsity, ablate)
    x = torch.randn(1, 3, 224, 224)
    print(f"{name}: {sparsity:.0%} constant fan-in, {ablate:.0%} of neurons ablated (random weights)\n")
    compiled = sparsecc.compile(model, (x,), backend=backend, autotune=autotune)
    print(compiled.report, end="\n\n")
    dense = sparsecc.masked_reference(model)
    t = medians({"dense": lambda: dense(x), "sparsecc": lambda: compiled(x)}, runs=runs)
    print(f"batch-1 latency, {threads} thread(s), median of {runs}: dense torch eager {t['dense'] * 1e3:.1f} ms, "
          f"sparsecc ({compiled.report.runtime}) {t['sparsecc'] * 1e3:.1f} ms -> "
          f"{t['dense'] / t['sparsecc']:.2f}x")
    return compiled
