"""``python -m tests.fuzz --cases N [--first S] [--workers W] [--backends a,b]``: run N seeded cases on every
backend (the slower paths on their seeded share) and print, per backend, cases, passes, refusals with their
reasons, and failures with their seeds. Exit status 1 when anything failed."""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import sys
import time
import warnings


def _work(args: tuple[int, list[str]]) -> list[tuple[int, str, str, str, str]]:
    warnings.simplefilter("ignore")
    from tests.fuzz.generate import case
    from tests.fuzz.run import run, runs_on

    seed, backends = args
    results = []
    for backend in backends:
        if runs_on(seed, backend):
            c = case(seed)
            outcome = run(c, backend)
            results.append((seed, backend, outcome.status, outcome.detail, str(c)))
    return results


def main(argv: list[str] | None = None) -> int:
    from tests.fuzz.run import BACKENDS

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
    seeds = [(s, backends) for s in range(opts.first, opts.first + opts.cases)]
    with multiprocessing.get_context("spawn").Pool(opts.workers, maxtasksperchild=50) as pool:
        for done, results in enumerate(pool.imap_unordered(_work, seeds), 1):
            for seed, backend, status, detail, what in results:
                counts[backend][status] += 1
                if status == "refused":
                    refusals[backend][detail.split(":", 1)[0] + ":" + detail.split(":", 1)[-1][:90]] += 1
                elif status == "fail":
                    failures.append((seed, backend, detail, what))
                    print(f"FAIL {backend} {what}\n     {detail[:600]}", flush=True)
            if done % 50 == 0:
                print(f"... {done}/{len(seeds)} seeds, {time.time() - start:.0f} s", flush=True)
    print(f"\n{len(seeds)} seeds (first {opts.first}) in {time.time() - start:.0f} s, {opts.workers} workers")
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
