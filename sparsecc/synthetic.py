"""Synthetic masks for demos, tests and benchmarks: the structures SRigL and ASP produce, chosen by weight
magnitude on a model with random weights (no training, no downloads)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils import prune

from sparsecc.passes.masks import transposed_weights, weight_slots

Selector = Callable[[str, str], bool]   # (weight fqn, layer kind) -> sparsify it?


def selected_weights(model: nn.Module, include: Optional[Selector]) -> dict[str, torch.Tensor]:
    """The selected weights as ``[out, in, ...]`` views (a transformers Conv1D's ``[in, out]`` weight transposed):
    masks are made along the input axis; `user_layout` puts them back."""
    out = {}
    transposed = transposed_weights(model)
    for module, attr, _, kind in weight_slots(model):
        fqn = f"{module}.{attr}" if module else attr
        if include is None or include(fqn, kind):
            w = getattr(model.get_submodule(module), attr).detach()
            out[fqn] = w.t() if fqn in transposed else w
    return out


def user_layout(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks made on `selected_weights` in the layout of the model's own weights."""
    transposed = transposed_weights(model)
    return {fqn: m.t() if fqn in transposed else m for fqn, m in masks.items()}


def fanin_mask(weight: torch.Tensor, sparsity: float, ablate: float = 0.0,
               generator: Optional[torch.Generator] = None, weakest: bool = False) -> torch.Tensor:
    """Constant fan-in: each live row keeps its ``round((1-sparsity)*fan_in)`` largest |w|; a fraction
    ``ablate`` of rows is all zero, as SRigL's ablated neurons: chosen at random, or with ``weakest`` the rows
    whose kept weights have the least energy (what `sparsecc.sparsify` ablates)."""
    rows = weight.detach().reshape(weight.shape[0], -1).abs()
    k = min(rows.shape[1], max(1, round((1.0 - sparsity) * rows.shape[1])))
    mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, rows.topk(k, dim=1).indices, True)
    n_ablate = int(round(ablate * rows.shape[0]))
    if n_ablate and weakest:
        mask[(rows * mask).pow(2).sum(1).topk(n_ablate, largest=False).indices] = False
    elif n_ablate:
        mask[torch.randperm(rows.shape[0], generator=generator)[:n_ablate]] = False
    return mask.reshape(weight.shape)


def nm_mask(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 along the input axis (Linear dim 1, Conv2d channel dim)."""
    w = weight if weight.dim() == 2 else weight.permute(0, 2, 3, 1)
    groups = w.abs().reshape(*w.shape[:-1], -1, 4)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    mask = mask.reshape(w.shape)
    return mask if weight.dim() == 2 else mask.permute(0, 3, 1, 2)


def fanin_masks(model: nn.Module, sparsity: float = 0.9, ablate: float = 0.0, include: Optional[Selector] = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return user_layout(model, {fqn: fanin_mask(w, sparsity, ablate, g)
                               for fqn, w in selected_weights(model, include).items()})


def nm_masks(model: nn.Module, include: Optional[Selector] = None) -> dict[str, torch.Tensor]:
    return user_layout(model, {fqn: nm_mask(w) for fqn, w in selected_weights(model, include).items()})


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
