"""Latency measurement for the demo and benchmarks: interleaved rounds, medians, ratios from one process.

Rounds alternate between the contenders so that noise from a shared machine hits all of them alike; a ratio
of two medians measured this way is the number to quote, never an absolute time alone. Within a round each
contender runs a burst of calls: with ``burst > 1`` the median sees it with its own data in cache (a layer
micro-benchmark), with ``burst=1`` every call follows the others' (as a layer inside a large model).

Contenders with thread pools of their own (onnxruntime, OpenVINO's, torch's OpenMP workers) leave them spinning
after a call, and at several threads those spinners take the cores of the next contender's first call:
ResNet-18 at 2 threads (Xeon), OpenVINO's default right after dense torch ran 2.0 ms against 1.1 ms run on its
own, dense torch right after an onnxruntime session that spins 20 ms against 8. ``settle`` untimed calls at the
start of each contender's turn let the previous pools wind down (`SETTLE` for whole-model comparisons).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Optional

import torch


def all_cores() -> int:
    """The cores this process may run on: torch's default thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: The thread counts every benchmark reports: one, and every core.
THREADS = tuple(sorted({1, all_cores()}))

#: Untimed calls at the start of each contender's turn where contenders run on different thread pools (see the
#: module docstring). Measured on that ResNet-18 (2 threads, five methods): OpenVINO's default 4.6x dense with
#: none, 5.5x with one, 6.4x with two, 7.7x each method run alone.
SETTLE = 2


def medians(fns: dict[str, Callable[[], Any]], runs: int = 20, warmup: int = 3, burst: int = 1,
            before: Optional[Callable[[], Any]] = None, budget_s: float = 0.0,
            max_runs: int = 60, settle: int = 0) -> dict[str, float]:
    """Median seconds per call of each function over ``runs`` interleaved rounds of ``burst`` calls each;
    ``before`` runs untimed before every timed call (a cache flush); ``settle`` untimed calls open each
    function's turn in a round (`SETTLE`). With ``budget_s``, short calls get more rounds (up to ``max_runs``),
    as many as the budget holds at the last warm-up round's pace: a choice between 0.2 ms one-token forms taken
    on 5 rounds flipped with the machine's noise."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            start = time.perf_counter()
            for fn in fns.values():
                fn()
            pace = time.perf_counter() - start
        if budget_s and warmup:
            runs = max(runs, min(max_runs, int(budget_s / max(pace * burst, 1e-9))))
        for _ in range(runs):
            for name, fn in fns.items():
                for _ in range(settle):
                    fn()
                for _ in range(burst):
                    if before is not None:
                        before()
                    start = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}
