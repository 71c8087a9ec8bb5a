"""The condense plan: each layer's analysis, and the condensed module that replaces it where its pattern
(`sparsecc.patterns`) has a rule for its kind.

A rule raises `NotCondensable` with the reason when a layer of the right structure still cannot be rewritten
(an unsupported conv padding mode, 2:4 along the wrong axis, ...). Layers without a rule stay as they are;
`plan` says why for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from sparsecc import patterns
from sparsecc.layers import CondensedLayer
from sparsecc.passes.analysis import Analysis, analyse
from sparsecc.passes.masks import Layer, Prepared
from sparsecc.patterns import NotCondensable, Source


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
