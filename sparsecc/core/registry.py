"""The runtime registry: backends are plug-ins, one folder each under `runtimes/`, imported only when asked for
(by the module path in `RUNTIMES` / `ENGINES`), each declaring what it supports. The registry lives in the core
so that layers, ops and the compiler find a backend by name without importing any.

Two kinds, with one typed interface each (checked when a module is loaded):

- **Op runtimes** (`RUNTIMES`, interface `OpRuntime`) run single sparsecc ops inside the torch model: ``NAME``,
  ``DTYPES``, ``KERNELS`` (op name -> callable with the op's arguments minus ``runtime``; usually a
  `sparsecc.core.patterns.OpTable` over the registered patterns' ops) and ``unavailable() -> str | None`` (why it
  cannot run here, or None). It may define ``bind(op, *constants) -> callable(x)``: work that depends only on
  a layer's tensors is then done once per layer instead of once per call.
- **Engines** (`ENGINES`, interface `Engine`) run a whole exported model instead: ``NAME``, ``EXPORT`` (the
  `export_onnx` arguments it is fed: mode, precision, free axes), ``OPTIONS`` (the ``runtime_options`` it accepts),
  ``KEEPS_FILE`` (whether the ONNX file must outlive loading), ``unavailable()`` and
  ``load(onnx_path, input_names, outputs, *, example_inputs, **options) -> nn.Module``.

`compile(backend=...)` takes either; the report names the op runtime of each layer (``runtime``) and the engine
that runs the whole graph, if any (``engine``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import torch

from sparsecc.core.errors import RuntimeUnavailableError

#: Runtime name -> module implementing it. ``auto`` picks the first available one in PREFERENCE.
RUNTIMES: dict[str, str] = {
    "tvm": "sparsecc.runtimes.tvm.runtime",               # TensorIR kernels compiled by LLVM for this CPU
    "reference": "sparsecc.runtimes.reference.runtime",   # pure torch, runs everywhere: the correctness oracle
}
#: ``auto`` and per-op fallback order: the first available runtime that runs an op and dtype gets it.
PREFERENCE: tuple[str, ...] = ("tvm", "reference")
#: Engine name -> module running a whole exported model (`compile(backend=name)` exports to it).
ENGINES: dict[str, str] = {
    "onnxruntime": "sparsecc.runtimes.onnxruntime.engine",   # condensed ONNX in an InferenceSession, CPU
    "tensorrt": "sparsecc.runtimes.tensorrt.engine",         # dense fp16 ONNX -> engine with sparse weights, GPU
}


@runtime_checkable
class OpRuntime(Protocol):
    """What an op runtime module defines (``bind`` is optional)."""

    NAME: str
    DTYPES: tuple[torch.dtype, ...]
    KERNELS: Mapping[str, Callable]

    def unavailable(self) -> Optional[str]: ...


@runtime_checkable
class Engine(Protocol):
    """What an engine module defines."""

    NAME: str
    EXPORT: Mapping[str, str]
    OPTIONS: tuple[str, ...]
    KEEPS_FILE: bool

    def unavailable(self) -> Optional[str]: ...

    def load(self, onnx_path: Any, input_names: list[str], outputs: Any, **options: Any) -> torch.nn.Module: ...


def _module(name: str, table: Mapping[str, str], interface: type) -> Any:
    module = importlib.import_module(table[name])
    if not isinstance(module, interface):
        raise TypeError(f"{table[name]} does not implement the {interface.__name__} interface "
                        f"(sparsecc/core/registry.py)")
    return module


@dataclass(frozen=True)
class Runtime:
    name: str
    dtypes: frozenset[torch.dtype]
    kernels: Mapping[str, Callable]      # a live view for runtimes that read the pattern table
    binder: Optional[Callable] = None
    #: Ops whose bound kernels run two layers with elementwise ops between as one call (`sparsecc.core.chain`;
    #: a runtime module's optional ``CHAINS``).
    chains: frozenset[str] = frozenset()

    def bind(self, op: str, *constants) -> Callable:
        """``op`` with everything but its input fixed."""
        if self.binder is not None:
            return self.binder(op, *constants)
        self.kernel(op)
        return lambda x: self.kernels[op](x, *constants)

    def supports(self, op: str, dtype: torch.dtype) -> bool:
        return op in self.kernels and dtype in self.dtypes

    def kernel(self, op: str) -> Callable:
        try:
            return self.kernels[op]
        except KeyError:
            raise RuntimeUnavailableError(f"runtime {self.name!r} has no kernel for sparsecc::{op}; "
                                          f"it runs {sorted(self.kernels)}") from None


def unavailable(name: str) -> Optional[str]:
    """Why runtime or engine ``name`` cannot run here, or None when it can."""
    if name not in RUNTIMES and name not in ENGINES:
        return f"unknown backend {name!r}; choose one of {sorted(RUNTIMES) + sorted(ENGINES)} or 'auto'"
    try:
        module = _module(name, RUNTIMES, OpRuntime) if name in RUNTIMES else _module(name, ENGINES, Engine)
    except ImportError as exc:
        return f"runtime {name!r} cannot be imported: {exc}"
    return module.unavailable()


def engine(name: str):
    """The module of engine ``name`` (imported now; it may still lack its device, see ``unavailable``)."""
    return _module(name, ENGINES, Engine)


@lru_cache(maxsize=None)
def get_runtime(name: str) -> Runtime:
    why = unavailable(name)
    if why is not None:
        raise RuntimeUnavailableError(why)
    module = _module(name, RUNTIMES, OpRuntime)
    return Runtime(module.NAME, frozenset(module.DTYPES), module.KERNELS, getattr(module, "bind", None),
                   frozenset(getattr(module, "CHAINS", ())))


def for_op(backend: str, op: str, dtype: torch.dtype) -> tuple[str, str]:
    """The runtime that runs ``op`` on ``dtype`` under ``backend``, and why it is not ``backend`` if not."""
    primary = resolve(backend)
    if get_runtime(primary).supports(op, dtype):
        return primary, ""
    for name in PREFERENCE:
        if unavailable(name) is None and get_runtime(name).supports(op, dtype):
            return name, f"{primary} has no {op} kernel for {str(dtype).removeprefix('torch.')}: runs on {name}"
    raise RuntimeUnavailableError(f"no available runtime runs sparsecc::{op} on {dtype}")


def resolve(backend: str) -> str:
    """The runtime a ``backend=`` argument means on this machine."""
    if backend != "auto":
        get_runtime(backend)
        return backend
    for name in PREFERENCE:
        if unavailable(name) is None:
            return name
    raise RuntimeUnavailableError("no runtime is available (not even 'reference'): is torch installed?")
