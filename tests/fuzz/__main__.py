"""``python -m tests.fuzz --cases N [--first S] [--workers W] [--backends a,b]``: run N seeded cases on every
backend (the slower paths on their seeded share) and print, per backend, cases, passes, refusals with their
reasons, and failures with their seeds. Exit status 1 when anything failed."""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path


def _reason(detail: str) -> str:
    """A refusal's kind: its error type and the last clause of its message (the why), numbers elided."""
    kind, _, message = detail.partition(": ")
    return f"{kind}: {re.sub(r'[-+]?[0-9][0-9.e+-]*', 'N', message.rsplit('; ', 1)[-1])[:220]}"


def _crashed(journal: str, finished: set[tuple[int, str]]) -> list[tuple[int, str]]:
    """Cases a dead worker started and never finished."""
    started = [tuple(line.split()[1:]) for line in Path(journal).read_text().splitlines()]
    return [(int(s), b) for s, b in started if (int(s), b) not in finished]


def main(argv: list[str] | None = None) -> int:
    from tests.fuzz.run import BACKENDS, work

    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    opts = parser.parse_args(argv)
    backends = opts.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    counts: dict[str, collections.Counter] = {b: collections.Counter() for b in backends}
    refusals: dict[str, collections.Counter] = {b: collections.Counter() for b in backends}
    failures: list[tuple[int, str, str, str]] = []
    journal = tempfile.mktemp(prefix="sparsecc-fuzz-", suffix=".log")
    Path(journal).touch()
    pending = list(range(opts.first, opts.first + opts.cases))
    finished: set[tuple[int, str]] = set()
    consumed: set[int] = set()
    done = 0
    while pending:
        with ProcessPoolExecutor(opts.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                futures = {pool.submit(work, seed, backends, journal): seed for seed in pending}
                pending = []
                for future in as_completed(futures):
                    done += 1
                    consumed.add(futures[future])
                    for seed, backend, status, detail, what in future.result():
                        finished.add((seed, backend))
                        counts[backend][status] += 1
                        if status == "refused":
                            refusals[backend][_reason(detail)] += 1
                        elif status == "fail":
                            failures.append((seed, backend, detail, what))
                            print(f"FAIL {backend} {what}\n     {detail[:600]}", flush=True)
                    if done % 50 == 0:
                        print(f"... {done}/{opts.cases} seeds, {time.time() - start:.0f} s", flush=True)
            except BrokenProcessPool:
                dead = _crashed(journal, finished)
                for seed, backend in dead:
                    finished.add((seed, backend))
                    counts[backend]["fail"] += 1
                    failures.append((seed, backend, "the worker process died (crash)", f"seed {seed}"))
                    print(f"FAIL {backend} seed {seed}: the worker process died (crash)", flush=True)
                retry = {s for s, _ in dead}
                pending = [s for s in futures.values() if s not in consumed and s not in retry]
    Path(journal).unlink(missing_ok=True)
    print(f"\n{opts.cases} seeds (first {opts.first}) in {time.time() - start:.0f} s, {opts.workers} workers")
    print(f"{'backend':15} {'cases':>6} {'passes':>6} {'refusals':>8} {'failures':>8}")
    for backend in backends:
        c = counts[backend]
        print(f"{backend:15} {sum(c.values()):6} {c['pass']:6} {c['refused']:8} {c['fail']:8}")
    for backend in backends:
        for reason, n in refusals[backend].most_common():
            print(f"refused {backend} x{n}: {reason}")
    total = sum(c["pass"] + c["refused"] for c in counts.values())
    print(f"{total} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
