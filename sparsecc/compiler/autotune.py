"""Sparse kernel or dense op, per layer and token count (``compile(..., autotune=True)``, the default).

The choice itself lives in the runtime (`sparsecc.runtimes.tuning`: measured on first use of a token bucket
at a thread count, cached on disk), so it follows every call path (eager, torch.compile graphs, a loaded
.pt2) and every later token count or `torch.set_num_threads`. At compile time one run on the example inputs
makes the choices for the example's token counts, and the report shows each layer's choice and both timings.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsecc.core.inputs import Call
from sparsecc.core.layers import CondensedLayer
from sparsecc.core.report import LayerChange
from sparsecc.runtimes import tuning


def _condensed(module: nn.Module) -> list[CondensedLayer]:
    return [m for m in module.modules() if isinstance(m, CondensedLayer)]


def autotune(module: nn.Module, inputs: Call) -> tuple[tuple[str, LayerChange], ...]:
    """Make every condensed layer's choice for the example inputs; returns them per layer (`choices`)."""
    with torch.no_grad():
        inputs(module)
    return choices(module)


def choices(module: nn.Module) -> tuple[tuple[str, LayerChange], ...]:
    """The choices ``module``'s layers have made so far (every token bucket and thread count), per layer: the
    report's choices column, and ``+dense`` after the runtime of a layer that runs dense somewhere."""
    changes = []
    for layer in _condensed(module):
        made = sorted(layer.choices().values(), key=lambda c: (c.threads, c.tokens))
        if made:
            changes.append((layer.weight_fqn, LayerChange(choice="; ".join(c.describe() for c in made),
                                                          runs_dense=any(c.dense for c in made))))
    return tuple(changes)


def stream_if_large(module: nn.Module) -> bool:
    """Mark every condensed layer of ``module`` for cold measurement when the module's tensors exceed the
    last-level cache (each layer's weights then come from memory at every call), and for L2-cold measurement of
    decode-sized calls when they exceed one core's L2 (`tuning.beyond_l2`); returns whether they exceed the
    last-level cache."""
    held = sum({id(t): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}.values())
    if held > tuning.llc_bytes():
        for layer in _condensed(module):
            tuning.stream(layer._buffers["values"])
        return True
    if held > tuning.l2_bytes():
        for layer in _condensed(module):
            tuning.beyond_l2(layer._buffers["values"])
    return False


def disable(module: nn.Module) -> None:
    """Every condensed layer of ``module`` runs its sparse kernel at every token count."""
    for layer in _condensed(module):
        tuning.disable(layer._buffers["values"])
