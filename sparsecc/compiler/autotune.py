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
from sparsecc.core.report import Report
from sparsecc.runtimes import tuning


def _condensed(module: nn.Module) -> list[CondensedLayer]:
    return [m for m in module.modules() if isinstance(m, CondensedLayer)]


def autotune(module: nn.Module, inputs: Call, report: Report) -> None:
    """Make every condensed layer's choice for the example inputs and record it in ``report``."""
    with torch.no_grad():
        inputs(module)
    record(module, report)


def record(module: nn.Module, report: Report) -> None:
    """Write the choices ``module``'s layers have made so far (every token bucket and thread count) into
    ``report``: the choices column, and ``+dense`` after the runtime of a layer that runs dense somewhere."""
    by_name = {entry.name: entry for entry in report.layers}
    for layer in _condensed(module):
        entry = by_name.get(layer.weight_fqn)
        choices = sorted(layer.choices().values(), key=lambda c: (c.threads, c.tokens))
        if entry is None or not choices:
            continue
        entry.choice = "; ".join(c.describe() for c in choices)
        entry.runtime = entry.runtime.removesuffix("+dense") + ("+dense" if any(c.dense for c in choices) else "")


def stream_if_large(module: nn.Module) -> bool:
    """Mark every condensed layer of ``module`` for cold measurement when the module's tensors exceed the
    last-level cache (each layer's weights then come from memory at every call); returns whether they do."""
    held = {id(t): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}
    if sum(held.values()) <= tuning.llc_bytes():
        return False
    for layer in _condensed(module):
        tuning.stream(layer._buffers["values"])
    return True


def disable(module: nn.Module) -> None:
    """Every condensed layer of ``module`` runs its sparse kernel at every token count."""
    for layer in _condensed(module):
        tuning.disable(layer._buffers["values"])
