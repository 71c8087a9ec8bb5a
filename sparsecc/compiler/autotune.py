"""Sparse kernel or dense op, per layer and token count (``compile(..., autotune=True)``, the default).

The choice itself lives in the runtime (`sparsecc.runtimes.tuning`: measured on first use of a token bucket
at a thread count, cached on disk), so it follows every call path (eager, torch.compile graphs, a loaded
.pt2) and every later token count or `torch.set_num_threads`. At compile time one run on the example inputs
makes the choices for the example's token counts, and the report shows each layer's choice and both timings.

Each layer's choice is measured on the layer alone; `never_slower` then times the whole model on the example
inputs with those choices and with every layer dense, and keeps the faster: layers that won alone can lose
together (all-MiniLM-L6-v2 at 2:4, 2 threads, 16 tokens: six Linears 16% faster than dense alone, the model
0.88x dense with them and 0.94x without, on a Xeon with AVX-512). Where the layers' measured gains are a clear
margin (`CLEAR_GAIN` of the model's time), the model is timed with its choices only.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from sparsecc.core.inputs import Call
from sparsecc.core.layers import CondensedLayer
from sparsecc.core.report import LayerChange
from sparsecc.runtimes import tuning


def _condensed(module: nn.Module) -> list[CondensedLayer]:
    return [m for m in module.modules() if isinstance(m, CondensedLayer)]


def autotune(module: nn.Module, inputs: Call) -> tuple[tuple[tuple[str, LayerChange], ...], Optional[str]]:
    """Make every condensed layer's choice for the example inputs and check them on the whole model
    (`never_slower`); returns them per layer (`choices`) and the whole-model check's note."""
    since = tuning.routes_made()
    with torch.no_grad():
        inputs(module)
    note = never_slower(module, inputs, since)
    return choices(module), note


#: The whole model must run this much faster with its layers' sparse choices than with every layer dense, else
#: it runs dense at the example's call sizes: a near-tie goes to the op the user's model runs.
MODEL_MARGIN = 0.02

#: Where the sparse choices' gains measured layer by layer add up to this share of the model's own time (all
#: dense would take 1.5x as long), the model is not timed all dense: no interaction between layers makes up
#: that much, and building and running every dense form for the check cost ViT-B/16 at 90% 5.5 s of a 14.4 s
#: warm compile (Zen 3, 1 thread), where its layers' gains are 1.3x the model's time. Near-ties (2:4, a few
#: sparse layers) are timed both ways.
CLEAR_GAIN = 0.5


def _switchable(module: nn.Module, since: int) -> list[tuple[Any, tuple[int, int]]]:
    """(bound layer, bucket) pairs where a layer runs its sparse kernel by a choice settled after ``since``
    (`tuning.routes_made`), on runtimes that can run the dense op instead (`run_dense`)."""
    pairs = []
    for layer in _condensed(module):
        bound = layer.__dict__.get("_bound")
        if bound is not None and hasattr(bound[2], "run_dense"):
            pairs += [(bound[2], key) for key in bound[2].sparse_buckets(since)]
    return pairs


def never_slower(module: nn.Module, inputs: Call, since: int = 0, what: str = "the example inputs") -> Optional[str]:
    """Time ``module`` on ``inputs`` with its layers' measured choices settled after ``since`` (those the call
    made: other call sizes keep theirs) and with every such layer dense (interleaved medians), and keep the
    faster (`MODEL_MARGIN`), unless the gains are a clear margin (`CLEAR_GAIN`); a note on the outcome, or None
    where no such layer runs sparse. ``inputs`` is run again and again: a call that changes state it is given
    (a KV cache) must not come here."""
    from sparsecc.core import timing

    pairs = _switchable(module, since)
    if not pairs:
        return None

    def run(dense: bool) -> None:
        for bound, key in pairs:
            bound.run_dense(key, dense)
        inputs(module)

    bounds = {id(b): b for b, _ in pairs}
    clear = _clear_gain(pairs, lambda: run(False))
    if clear is not None:
        for bound in bounds.values():
            bound.settle()
        return (f"whole model at {what}, {torch.get_num_threads()} thread(s): {clear[0] * 1e3:,.2f} ms with the "
                f"layers' choices, whose gains measured layer by layer add up to {clear[1] * 1e3:,.2f} ms: keeps "
                f"its {len(bounds)} layer(s)' sparse choices (a clear margin: not timed with every layer dense)")
    # A warm-up round builds the dense forms; three rounds bound the cost of a large model (ViT-B/16: about
    # 1.4 s of a compile), a small one gets as many as half a second holds (up to 60).
    times = timing.medians({"chosen": lambda: run(False), "dense": lambda: run(True)}, runs=3, warmup=1,
                           budget_s=0.5)
    dense = times["dense"] < times["chosen"] * (1 + MODEL_MARGIN)
    for bound, key in pairs:
        bound.run_dense(key, dense)
    for bound in bounds.values():
        bound.settle()
    layers = len(bounds)
    outcome = (f"runs every layer dense at these call sizes (its {layers} sparse choice(s) are not {MODEL_MARGIN:.0%} "
               f"faster together)") if dense else f"keeps its {layers} layer(s)' sparse choices"
    return (f"whole model at {what}, {torch.get_num_threads()} thread(s): "
            f"{times['chosen'] * 1e3:,.2f} ms with the layers' choices, {times['dense'] * 1e3:,.2f} ms with every "
            f"layer dense: {outcome}")


def _clear_gain(pairs: list, chosen: Callable[[], None]) -> Optional[tuple[float, float]]:
    """(the model's seconds with its choices, their gains' sum) where the sparse choices' gains measured layer by
    layer are at least `CLEAR_GAIN` of the model's time, else None. The model takes at least its sparse layers'
    time, so where the gains fall short of that bound's share the model is not even timed."""
    from sparsecc.core import timing

    made = [bound.choices[key] for bound, key in pairs]
    gain = sum(max(0.0, c.dense_s - c.sparse_s) for c in made)
    if gain < CLEAR_GAIN * sum(c.sparse_s for c in made):
        return None
    model = timing.medians({"model": chosen}, runs=2, warmup=0)["model"]
    return (model, gain) if gain >= CLEAR_GAIN * model else None


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
