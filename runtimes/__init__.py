"""The backends: one folder each (`reference`, `tvm`, `onnxruntime`, `tensorrt`, `triton`), found by name through
the registry in `sparsecc.core.registry` (re-exported here), plus what several share: measuring a layer's
sparse kernel against its dense op (`tuning`), the CPU's identity for cache keys (`cpu`), per-layer binding
caches (`binding`), the exported files' signatures (`signature`) and the writers' common refusals
(`exporting`). Below, the helpers engines share."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from sparsecc.core.errors import InputError
from sparsecc.core.registry import (ENGINES, PREFERENCE, RUNTIMES, Engine, OpRuntime, Runtime, engine, for_op,
                                    get_runtime, resolve, unavailable)

__all__ = ["ENGINES", "PREFERENCE", "RUNTIMES", "Engine", "OpRuntime", "Runtime", "engine", "for_op", "get_runtime",
           "resolve", "unavailable", "refuse_grad", "file_inputs"]


def refuse_grad(engine_name: str, inputs: tuple) -> None:
    """Engines run outside autograd: an input that wants a gradient would silently get none."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        raise InputError(f"the {engine_name} engine runs outside autograd and gives no gradient: call it under "
                         f"torch.no_grad() / torch.inference_mode() or pass inputs that do not require grad")


def file_inputs(arrangement: Any, args: tuple, kwargs: Mapping[str, Any], names: list[str],
                engine_name: str) -> list[torch.Tensor]:
    """An engine's call as the exported file's input tensors, in its order. With an ``arrangement`` (an
    `inputs.Arrangement`) the call is bound as the model binds it, so keywords work and a missing or unknown
    input is an `InputError` naming it; without one, the tensors are taken by position."""
    if arrangement is not None:
        tensors = arrangement.arrange(args, kwargs).tensors()
    elif kwargs:
        raise InputError(f"the {engine_name} engine was exported with positional inputs ({', '.join(names)}): "
                         f"pass them in that order")
    else:
        tensors = list(args)
    if len(tensors) != len(names):
        raise InputError(f"the {engine_name} engine takes {len(names)} input tensor(s) ({', '.join(names)}), "
                         f"got {len(tensors)}")
    return tensors
