"""Rewrite rules: (layer kind, structure) -> the condensed module that replaces the layer.

A rule raises `NotCondensable` with the reason when a layer of the right structure still cannot be rewritten
(an unsupported conv padding mode, 2:4 along the wrong axis, ...). Kinds and structures absent from `RULES`
stay as they are; `plan` says why for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from sparsecc import formats, runtimes
from sparsecc.layers import CondensedConv2d, CondensedLayer, CondensedLinear, NMLinear
from sparsecc.passes.analysis import Analysis, analyse
from sparsecc.passes.masks import Layer, Prepared
from sparsecc.passes.structures import NM, ChannelStructured, ConstantFanIn


class NotCondensable(Exception):
    """A rule's refusal; the message is the reason shown in the report."""


@dataclass(frozen=True)
class Source:
    """What a rule needs: the layer, its masked weight and bias, and the module that owned it."""

    layer: Layer
    analysis: Analysis
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    owner: nn.Module


def _fanin(src: Source, k: int) -> formats.FanIn:
    w, m = src.weight.detach(), src.layer.mask.to(src.weight.device)
    return formats.encode_fanin(w.reshape(w.shape[0], -1), m.reshape(m.shape[0], -1), k)


def _k(src: Source) -> int:
    counts = src.layer.mask.reshape(src.layer.mask.shape[0], -1).sum(dim=1)
    live = counts[counts > 0]
    if live.numel() and not bool((live == live[0]).all()):
        raise NotCondensable(f"2:4 but fan-in varies from {int(live.min())} to {int(live.max())} per filter; "
                             f"sparsecc runs 2:4 convolutions as constant fan-in")
    return int(live[0]) if live.numel() else 0


def condensed_linear(src: Source) -> CondensedLayer:
    return CondensedLinear(src.layer.module, src.layer.fqn, src.layer.bias, _fanin(src, _k(src)), src.bias,
                           tuple(src.weight.shape))


def nm_linear(src: Source) -> CondensedLayer:
    structure = src.analysis.structure
    assert isinstance(structure, NM)
    if structure.axis != 1:
        raise NotCondensable("2:4 along the output axis; sparsecc and TensorRT need it along K (the input axis)")
    values, metadata = formats.encode_nm(src.weight.detach(), src.layer.mask.to(src.weight.device))
    return NMLinear(src.layer.module, src.layer.fqn, src.layer.bias, values, metadata, src.bias,
                    tuple(src.weight.shape))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise NotCondensable(f"padding_mode={conv.padding_mode!r}; sparsecc's convolutions pad with zeros only")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise NotCondensable("padding='same' with an even kernel pads asymmetrically; use explicit padding")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)  # type: ignore[return-value]


def condensed_conv2d(src: Source) -> CondensedLayer:
    conv = src.owner
    assert isinstance(conv, nn.Conv2d)
    padding = _conv_padding(conv)
    return CondensedConv2d(src.layer.module, src.layer.fqn, src.layer.bias, _fanin(src, _k(src)), src.bias,
                           tuple(src.weight.shape), tuple(conv.stride), padding, tuple(conv.dilation),
                           conv.groups)


#: (layer kind, structure type) -> rule building the replacement module.
RULES: dict[tuple[str, type], Callable[[Source], CondensedLayer]] = {
    ("linear", ConstantFanIn): condensed_linear,        # values + indices per kept row, ablated rows -> bias
    ("linear", ChannelStructured): condensed_linear,    # every kept row reads the same kept inputs
    ("linear", NM): nm_linear,                          # half the values + 2-bit positions
    ("conv2d", ConstantFanIn): condensed_conv2d,        # fan-in over C/groups*R*S
    ("conv2d", ChannelStructured): condensed_conv2d,
    ("conv2d", NM): condensed_conv2d,                   # an exact 2:4 conv is constant fan-in C*R*S/2
}


@dataclass
class Decision:
    """The plan for one layer: its analysis, and either a replacement module or the reason it stays."""

    layer: Layer
    analysis: Analysis
    replacement: Optional[CondensedLayer]
    reason: str                 # why the layer is kept, or why it runs on a fallback runtime


def plan(prepared: Prepared, backend: str) -> dict[str, Decision]:
    """Analyse every layer, build the replacement of each one that can be condensed and pick its runtime."""
    decisions: dict[str, Decision] = {}
    ref = prepared.reference
    for fqn, layer in prepared.layers.items():
        analysis = analyse(fqn, layer.mask)
        replacement, reason = None, analysis.reason
        rule = RULES.get((layer.kind, type(analysis.structure)))
        if rule is not None:
            owner = ref.get_submodule(layer.module)
            weight = ref.get_parameter(fqn)
            src = Source(layer, analysis, weight, ref.get_parameter(layer.bias) if layer.bias else None, owner)
            try:
                replacement = rule(src)
            except NotCondensable as exc:
                reason = str(exc)
            else:
                replacement.runtime, reason = runtimes.for_op(backend, replacement.op, weight.dtype)
        if layer.shared_with:
            reason = "; ".join(filter(None, [f"tensor shared with {', '.join(layer.shared_with)}: this use has its "
                                             f"own copy", reason]))
        decisions[fqn] = Decision(layer, analysis, replacement, reason)
    return decisions
