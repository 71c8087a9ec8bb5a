"""SWAT-style sparsifying layers, and the hook that folds any sparsifying module into a static mask.

SWAT (Raihan & Aamodt, 2020) applies magnitude top-K to the weight in every forward pass: SWAT-U keeps the
largest ``density`` fraction of ``|w|`` over the whole layer; the channel variant keeps, per output filter,
the input channels with the largest L1 norm ("different filters can select different active channels"), so
every filter keeps the same number of channels — constant fan-in, which sparsecc condenses.

At compile time the weights are fixed, so the top-K is too. The fold hook: a module that defines
``sparsecc_fold(self) -> (module, {"weight": mask})`` is replaced in sparsecc's reference copy by the plain
module it returns (an ``nn.Linear`` / ``nn.Conv2d`` computing the same function with the mask applied), and
the mask is used as that weight's mask (report source ``"module"``). Users' own sparsifying modules
implement the same method.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecc.capture.masks import Foldable  # noqa: F401  (what TopKLinear / TopKConv2d implement)
from sparsecc.core.errors import InputError


def topk_mask(weight: Tensor, density: float, structured: bool) -> Tensor:
    """SWAT's top-K: the ``density`` fraction of largest ``|w|`` in the layer, or with ``structured`` the
    largest-L1 input channels of each output filter (at least one of each)."""
    if not 0.0 < density <= 1.0:
        raise InputError(f"density={density}: a fraction of weights to keep, in (0, 1]")
    w = weight.detach().abs()
    if structured:
        norms = w.flatten(2).sum(2) if w.dim() > 2 else w          # [out, in] channel L1 norms
        keep = max(1, round(density * norms.shape[1]))
        top = norms.topk(keep, dim=1).indices
        chosen = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, top, True)
        return chosen.view(*chosen.shape, *([1] * (w.dim() - 2))).expand_as(w).clone()
    keep = max(1, round(density * w.numel()))
    top = w.flatten().topk(keep).indices
    return torch.zeros(w.numel(), dtype=torch.bool, device=w.device).scatter_(0, top, True).view_as(w)


def _fold(layer: "_TopK", plain: nn.Module) -> tuple[nn.Module, dict[str, Tensor]]:
    """``plain`` given the layer's current top-K weight and bias, and that mask."""
    mask = layer.mask()
    with torch.no_grad():
        plain.weight.copy_(layer.weight * mask)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    return plain, {"weight": mask}


class _TopK:
    """What both top-K layers share: their settings, checked at construction, and the mask of the moment."""

    weight: Tensor

    def _top_k(self, density: float, structured: bool) -> None:
        topk_mask(self.weight, density, structured)      # validates density now, not at the first call
        self.density, self.structured = density, structured

    def mask(self) -> Tensor:
        return topk_mask(self.weight, self.density, self.structured)


class TopKLinear(_TopK, nn.Linear):
    """``nn.Linear`` whose forward uses only its top-K weights (recomputed every call, as in SWAT training)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, density: float = 0.1,
                 structured: bool = False, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._top_k(density, structured)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask(), self.bias)

    def sparsecc_fold(self) -> tuple[nn.Module, dict[str, Tensor]]:
        return _fold(self, nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                     device=self.weight.device, dtype=self.weight.dtype))


class TopKConv2d(_TopK, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses only its top-K weights (``structured``: top-K input channels per
    filter by L1 norm)."""

    def __init__(self, *args, density: float = 0.1, structured: bool = False, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._top_k(density, structured)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask(), self.bias)

    def sparsecc_fold(self) -> tuple[nn.Module, dict[str, Tensor]]:
        return _fold(self, nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                     self.padding, self.dilation, self.groups, self.bias is not None,
                                     self.padding_mode, device=self.weight.device, dtype=self.weight.dtype))


def swatify(model: nn.Module, density: float, structured: bool = False) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` / ``nn.Conv2d`` replaced by its top-K version holding the
    same weights: what a SWAT-trained model looks like."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear:
            new: nn.Module = TopKLinear(mod.in_features, mod.out_features, mod.bias is not None, density=density,
                                        structured=structured)
        elif type(mod) is nn.Conv2d:
            new = TopKConv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                             mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode, density=density,
                             structured=structured)
        else:
            continue
        new.load_state_dict(mod.state_dict())
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new.to(mod.weight.device).train(mod.training))
    return model
