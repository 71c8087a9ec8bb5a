"""Pure-torch kernels for every sparsecc op: the semantics every other runtime is checked against. Each
pattern defines its op's reference kernel (`sparsecc.core.patterns`); this runtime runs all of them, in every
floating dtype.

It is also where layers in dtypes the compiled kernels do not take (bf16, fp16) run, so it measures, like the
TVM runtime, whether the reference kernel or the op's dense torch op on the decoded weight is faster for each
layer shape, dtype, token bucket and thread count (`tuning.choose`, cached on disk), and runs the faster: a bf16
Linear on an AMX CPU runs oneDNN's dense bf16 GEMM (5x fp32 there) instead of a gather 20x slower than it.
Ops whose pattern gives no ``densify`` run the reference kernel.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import Tensor

from sparsecc.core import patterns
from sparsecc.runtimes import binding, tuning

NAME = "reference"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_tuning: Optional[tuning.TuningCache] = None


def unavailable() -> Optional[str]:
    return None


def tuning_cache() -> tuning.TuningCache:
    """This runtime's choices: keyed on the CPU and torch's version (no compiled kernels are involved)."""
    global _tuning
    with _lock:
        if _tuning is None:
            from sparsecc.runtimes import cpu
            from sparsecc.core.files import cache_root

            _tuning = tuning.TuningCache({"runtime": NAME, **cpu.identity(), "torch": torch.__version__},
                                         cache_root() / "tuning")
        return _tuning


def forget_caches() -> None:
    """Drop this process's choices (the next use reads them from disk again)."""
    global _tuning
    with _lock:
        _tuning = None


class Tuned:
    """One layer's op: the reference kernel or the dense op, whichever measured faster for this call's dtype,
    token bucket and thread count (the dense weight is decoded on first use)."""

    def __init__(self, op: patterns.Op, constants: tuple) -> None:
        self.op, self.constants = op, constants
        self.tune = op.densify is not None and tuning.enabled(constants[0])
        self.choices: dict[tuple, tuning.Choice] = {}
        self._made: dict[tuple, int] = {}        # when each bucket's choice was settled (`tuning.route_made`)
        self._dense: Optional[Callable[[Tensor], Tensor]] = None

    def sparse(self, x: Tensor) -> Tensor:
        # Looked up at each call: the pattern table is live (a pattern registered again takes effect at once).
        return patterns.op(self.op.name).reference(x, *self.constants)

    def dense(self, x: Tensor) -> Tensor:
        if self._dense is None:
            self._dense = self.op.densify(x, *self.constants)
        return self._dense(x)

    def signature(self, x: Tensor) -> tuple:
        shapes = tuple(tuple(c.shape) if isinstance(c, Tensor) else c for c in self.constants)
        return (NAME, self.op.name, str(x.dtype), tuple(x.shape[1:]), shapes)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.tune or x.device.type != "cpu" or torch.is_grad_enabled() and x.requires_grad:
            return self.sparse(x)
        tokens = self.op.tokens(x)
        key = (tuning.bucket(tokens), torch.get_num_threads(), x.dtype)
        choice = self.choices.get(key)
        if choice is None:
            choice = self.choices[key] = tuning.choose(tuning_cache(), self.signature(x), tokens,
                                                       lambda: self.sparse(x), lambda: self.dense(x),
                                                       tuning.streaming(self.constants[0]),
                                                       l2_cold=tuning.l2_cold(self.constants[0], tokens))
            self._made[key] = tuning.route_made()
        return self.dense(x) if choice.dense else self.sparse(x)

    def sparse_buckets(self, since: int = 0) -> list[tuple]:
        """The buckets at torch's thread count where this layer runs its reference kernel by measured choice,
        settled after ``since`` (`tuning.routes_made`)."""
        threads = torch.get_num_threads()
        return [key for key, c in self.choices.items()
                if key[1] == threads and self._made.get(key, 0) > since and not c.dense]

    def run_dense(self, key: tuple, dense: bool = True) -> None:
        """Run ``key``'s bucket on the dense op (or, ``dense=False``, the kernel again): the whole-model check
        (`sparsecc.compiler.autotune.never_slower`)."""
        choice = self.choices[key]
        if choice.whole_model != dense:
            self.choices[key] = replace(choice, dense=dense, whole_model=dense)

    def settle(self) -> None:
        """Nothing to drop: the dense weight is decoded once and kept."""


def bind(op: str, *constants) -> Callable[[Tensor], Tensor]:
    return Tuned(patterns.op(op), constants)


def _kernel_of(op: patterns.Op) -> Callable:
    return lambda x, *constants: binding.bound(f"_sparsecc_bound_{NAME}", bind, op.name, *constants)(x)


KERNELS = patterns.OpTable(_kernel_of)
