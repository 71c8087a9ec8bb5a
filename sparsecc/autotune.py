"""Optional autotune (``compile(..., autotune=True)``): time each condensed layer against its dense op on the
layer's own input from the example inputs; a layer whose kernel is slower runs dense instead. The report
keeps both timings either way."""

from __future__ import annotations

import logging

from torch import nn

from sparsecc.layers import DenseLayer, first_calls
from sparsecc.report import Report
from sparsecc.timing import medians

log = logging.getLogger("sparsecc")


def autotune(module: nn.Module, reference: nn.Module, inputs: tuple, report: Report, runs: int = 5) -> None:
    """Replace, in ``module``, every condensed layer slower than its dense op; note both times in ``report``."""
    by_name = {layer.name: layer for layer in report.layers}
    for path, (layer, x, _) in first_calls(module, inputs).items():
        weight = reference.get_parameter(layer.weight_fqn)
        bias = reference.get_parameter(layer.bias_fqn) if layer.bias_fqn else None
        op = layer.dense_op()
        times = medians({"condensed": lambda: layer(x), "dense": lambda: op(x, weight, bias)}, runs=runs, warmup=2,
                        burst=3)
        entry = by_name[layer.weight_fqn]
        timing = f"condensed {times['condensed'] * 1e6:,.0f} us vs dense {times['dense'] * 1e6:,.0f} us"
        if times["condensed"] <= times["dense"]:
            entry.reason = "; ".join(filter(None, (entry.reason, f"autotune: {timing}")))
            continue
        module.set_submodule(path, DenseLayer(layer.name, weight, bias, op))
        report.rewrites[layer.op] -= 1
        entry.keep(f"autotune: {timing} on the example input; runs dense")
        log.info("%s: %s", layer.weight_fqn, entry.reason)
    report.rewrites = +report.rewrites      # unary + drops the ops whose every layer went back to dense
