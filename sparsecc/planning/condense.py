"""The condense plan: each layer's analysis, and the condensed module that replaces it where its pattern
(`sparsecc.core.patterns`) has a rule for its kind.

A rule raises `NotCondensable` with the reason when a layer of the right structure still cannot be rewritten
(an unsupported conv padding mode, 2:4 along the wrong axis, ...). Layers without a rule stay as they are;
`plan` says why for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from sparsecc.capture.masks import Layer, Prepared
from sparsecc.core import patterns, reductions
from sparsecc.core.layers import CondensedLayer
from sparsecc.core.patterns import NotCondensable, Source
from sparsecc.core.report import LayerReport
from sparsecc.planning.analysis import Analysis, analyse


@dataclass
class Decision:
    """The plan for one layer: its analysis, and either a replacement module or the reason it stays."""

    layer: Layer
    analysis: Analysis
    replacement: Optional[CondensedLayer]
    reason: str                 # why the layer is kept, or why it runs on a fallback runtime


def rule_for(kind: str, analysis: Analysis) -> Optional[Callable[[Source], CondensedLayer]]:
    """The rule of the layer's pattern for its kind, if both have one."""
    pattern = patterns.of(analysis.structure)
    return pattern.rules.get(kind) if pattern is not None else None


def plan(prepared: Prepared) -> dict[str, Decision]:
    """Analyse every layer and build the replacement of each one that can be condensed (its runtime is picked by
    the pipeline's ``bind`` stage)."""
    decisions: dict[str, Decision] = {}
    ref = prepared.reference
    for fqn, layer in prepared.layers.items():
        analysis = analyse(fqn, layer.mask)
        replacement, reason = None, analysis.reason
        rule = rule_for(layer.kind, analysis)
        if rule is not None:
            owner = ref.get_submodule(layer.module)
            weight = ref.get_parameter(fqn)
            src = Source(layer, analysis, weight, ref.get_parameter(layer.bias) if layer.bias else None, owner)
            try:
                replacement = rule(src)
            except NotCondensable as exc:
                reason = str(exc)
        if layer.shared_with:
            reason = "; ".join(filter(None, [f"tensor shared with {', '.join(layer.shared_with)}: this use has its "
                                             f"own copy", reason]))
        decisions[fqn] = Decision(layer, analysis, replacement, reason)
    return decisions


def layer_report(decision: Decision, elem_bytes: int) -> LayerReport:
    """The report row of one decision: structure, bytes (actual buffer sizes) and MACs dense and condensed."""
    layer, analysis, rep = decision.layer, decision.analysis, decision.replacement
    shape = tuple(layer.mask.shape)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    bias_bytes = shape[0] * elem_bytes if layer.bias else 0
    dense_bytes = shape[0] * fan_in * elem_bytes + bias_bytes
    condensed = sum(b.numel() * b.element_size() for b in rep.buffers()) if rep is not None else dense_bytes
    nnz = reductions.count(layer.mask)
    ablated = getattr(analysis.structure, "ablated", ())
    return LayerReport(
        name=layer.fqn, kind=layer.kind, shape=shape, structure=str(analysis.structure), density=analysis.density,
        ablated=len(ablated), mask_source=layer.source, action=rep.op if rep is not None else "kept",
        reason=decision.reason, runtime=rep.runtime if rep is not None else "torch", bytes_dense=dense_bytes,
        bytes_condensed=condensed, macs_dense=shape[0] * fan_in,
        macs_sparse=nnz if rep is not None else shape[0] * fan_in)
