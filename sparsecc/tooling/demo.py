"""The main job on a built-in example: an SRigL-style sparse torchvision model, compiled, validated, timed."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torchvision
from torch import nn

import sparsecc
from sparsecc.core.timing import THREADS, medians
from sparsecc.tooling import synthetic

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
        runs: int = 10, threads: Optional[Sequence[int]] = None, autotune: bool = True,
        precision: str = "fp32", fuse: bool = False) -> sparsecc.CompiledModel:
    """Compile (at ``precision``, with ``fuse=`` at each thread count where ``fuse``: `sparsecc.compile`),
    validate and time ``name`` at each thread count (1 and every core by default), each ratio from interleaved
    rounds at that count, against dense fp32 eager."""

    counts = tuple(threads or THREADS)
    model = sparse_model(name, sparsity, ablate)
    x = torch.randn(1, 3, 224, 224)
    print(f"{name}: {sparsity:.0%} constant fan-in, {ablate:.0%} of neurons ablated (random weights)"
          + (f", run in {precision}" if precision != "fp32" else "") + (", fused" if fuse else "") + "\n")
    dense = sparsecc.masked_reference(model)
    torch.set_num_threads(counts[0])
    compiled = sparsecc.compile(model, (x,), backend=backend, autotune=autotune, precision=precision,
                                fuse=counts if fuse else False)
    lines = []
    for n in counts:
        # At a new thread count each layer's sparse-or-dense choice is measured on its first call (a warm-up).
        torch.set_num_threads(n)
        t = medians({"dense": lambda: dense(x), "sparsecc": lambda: compiled(x)}, runs=runs)
        lines.append(f"  {n} thread(s): dense torch eager {t['dense'] * 1e3:.1f} ms, sparsecc "
                     f"({compiled.report.runtime}) {t['sparsecc'] * 1e3:.1f} ms -> {t['dense'] / t['sparsecc']:.2f}x")
    compiled.record_choices()
    print(compiled.report, end="\n\n")
    print(f"batch-1 latency, median of {runs} interleaved rounds:", *lines, sep="\n")
    return compiled
