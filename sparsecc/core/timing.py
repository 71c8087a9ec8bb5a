"""Latency measurement for the demo and benchmarks: interleaved rounds, medians, ratios from one process.

Rounds alternate between the contenders so that noise from a shared machine hits all of them alike; a ratio
of two medians measured this way is the number to quote, never an absolute time alone. Within a round each
contender runs a burst of calls: with ``burst > 1`` the median sees it with its own data in cache (a layer
micro-benchmark), with ``burst=1`` every call follows the others' (as a layer inside a large model).
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


def medians(fns: dict[str, Callable[[], Any]], runs: int = 20, warmup: int = 3, burst: int = 1,
            before: Optional[Callable[[], Any]] = None, budget_s: float = 0.0,
            max_runs: int = 60) -> dict[str, float]:
    """Median seconds per call of each function over ``runs`` interleaved rounds of ``burst`` calls each;
    ``before`` runs untimed before every timed call (a cache flush). With ``budget_s``, short calls get more
    rounds (up to ``max_runs``), as many as the budget holds at the last warm-up round's pace: a choice between
    0.2 ms one-token forms taken on 5 rounds flipped with the machine's noise."""
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
                for _ in range(burst):
                    if before is not None:
                        before()
                    start = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}
