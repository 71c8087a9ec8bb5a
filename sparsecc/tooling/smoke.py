"""``sparsecc smoke`` (or ``python -m sparsecc.tooling.smoke``): run every registered op's samples
(`sparsecc.core.patterns.Op.samples`) on every runtime that runs the op, against the dense masked torch op, and every
engine on a small masked model, and print PASS / FAIL / UNAVAILABLE for each. Exits 1 if any fails."""

from __future__ import annotations

import sys

import torch

from sparsecc.compiler.validation import compare
from sparsecc.core import patterns
from sparsecc.runtimes import ENGINES, RUNTIMES, get_runtime, unavailable
from sparsecc.tooling.synthetic import fanin_mask


def smoke(runtime: str) -> list[str]:
    """Failures of ``runtime`` on every sample of every op it runs; empty when all pass."""
    g = torch.Generator().manual_seed(0)
    runs = get_runtime(runtime).kernels
    failures = []
    for name, op in patterns.ops().items():
        if name not in runs:
            continue
        for label, args, expected in op.samples(g, torch.float32):
            failures.append(compare(f"{name} {label}", op.function(*args, runtime), expected))
    return [str(s) for s in failures if not s.ok]


def smoke_engine(name: str) -> list[str]:
    """Failures of engine ``name`` compiling (and so validating) a small masked MLP; empty when it passes."""
    import sparsecc

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8)).eval()
    masks = {"0.weight": fanin_mask(model[0].weight, 0.75, ablate=0.25, generator=g)}
    try:
        compiled = sparsecc.compile(model, torch.randn(1, 40, generator=g), masks=masks, backend=name)
    except sparsecc.SparseccError as exc:
        return [str(exc)]
    x = torch.randn(3, 40, generator=g)
    with torch.no_grad():
        stat = compare(name, compiled(x), sparsecc.masked_reference(model, masks)(x),
                       1e-2 if name == "tensorrt" else None)
    return [] if stat.ok else [str(stat)]


def main() -> int:
    failed = False
    checks = [(name, smoke_engine, lambda n: "whole model") for name in ENGINES] + \
             [(name, smoke, lambda n: ", ".join(sorted(get_runtime(n).kernels))) for name in RUNTIMES]
    for name, check, what in checks:
        why = unavailable(name)
        if why is not None:
            print(f"UNAVAILABLE {name}: {why}")
            continue
        problems = check(name)
        failed |= bool(problems)
        print(f"{'FAIL' if problems else 'PASS'} {name} ({what(name)})" + "".join(f"\n  {p}" for p in problems))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
