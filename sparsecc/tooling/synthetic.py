"""Synthetic masks for demos, tests and benchmarks, made per model with `sparsecc.sparsify`'s primitives: the structures
SRigL and ASP produce, chosen by weight magnitude on a model with random weights (no training, no downloads)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import prune

from sparsecc.sparsify import Selector, fanin_mask, nm_mask, selected_weights, user_layout  # noqa: F401  (the mask

# primitives live with sparsify, which makes them for users; re-exported for the demos and tests)

def fanin_masks(model: nn.Module, sparsity: float = 0.9, ablate: float = 0.0, include: Optional[Selector] = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return user_layout(model, {fqn: fanin_mask(w, sparsity, ablate, g)
                               for fqn, w in selected_weights(model, include).items()})


def nm_masks(model: nn.Module, include: Optional[Selector] = None) -> dict[str, torch.Tensor]:
    """2:4 masks for the selected weights whose inputs come in whole groups of 4 (an image stem's 3 channels do
    not; NVIDIA ASP and `sparsecc.sparsify` leave those dense too)."""
    return user_layout(model, {fqn: nm_mask(w) for fqn, w in selected_weights(model, include).items()
                               if w.shape[1] % 4 == 0})


def structured_masks(model: nn.Module, structure: str, sparsity: float = 0.9, ablate: float = 0.0,
                     include: Optional[Selector] = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """``"fanin"`` (SRigL: ``sparsity``, ``ablate`` apply) or ``"2:4"`` masks for the selected weights."""
    if structure == "2:4":
        return nm_masks(model, include)
    if structure == "fanin":
        return fanin_masks(model, sparsity, ablate, include, seed)
    raise ValueError(f"structure {structure!r}: choose 'fanin' or '2:4'")


def attach_with_prune(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Attach masks as ``torch.nn.utils.prune`` hooks, the way a training script leaves them."""
    for fqn, mask in masks.items():
        module, _, attr = fqn.rpartition(".")
        prune.custom_from_mask(model.get_submodule(module), attr, mask)
    return model


def vit_encoder(fqn: str, kind: str) -> bool:
    """SRigL's choice on ViT: every encoder Linear (attention and MLP), stem and head stay dense."""
    return fqn.startswith("encoder.")


def all_but_stem(fqn: str, kind: str) -> bool:
    """ResNet: every convolution except the 7x7 stem; the classifier stays dense."""
    return kind == "conv2d" and fqn != "conv1.weight"
