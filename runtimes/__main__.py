"""``python -m sparsecc.runtimes``: run every op of every runtime on small random layers against the dense
masked torch op, and every engine on a small masked model, and print PASS / FAIL / UNAVAILABLE for each.
Exits 1 if any fails."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from sparsecc import formats, ops
from sparsecc.runtimes import ENGINES, RUNTIMES, get_runtime, unavailable
from sparsecc.synthetic import fanin_mask, nm_mask
from sparsecc.validation import compare


def smoke(runtime: str) -> list[str]:
    """Failures of ``runtime`` on one layer per op it runs; empty when all pass."""
    g = torch.Generator().manual_seed(0)
    runs = get_runtime(runtime).kernels
    failures = []
    w = torch.randn(24, 40, generator=g)
    mask = fanin_mask(w, 0.75, ablate=0.25, generator=g)
    enc = formats.encode_fanin(w * mask, mask, int(mask.sum(1).max()))
    b = torch.randn(24, generator=g)
    for tokens in (1, 33) if "condensed_linear" in runs else ():
        x = torch.randn(tokens, 40, generator=g)
        y = ops.condensed_linear(x, enc.values, enc.indices, enc.rows, b, 24, runtime)
        failures.append(compare(f"condensed_linear tokens={tokens}", y, F.linear(x, w * mask, b)))
    if "nm_linear" in runs:
        nm = nm_mask(w)
        values, meta = formats.encode_nm(w * nm, nm)
        x = torch.randn(3, 40, generator=g)
        failures.append(compare("nm_linear", ops.nm_linear(x, values, meta, b, 40, runtime), F.linear(x, w * nm, b)))
    if "condensed_conv2d" not in runs:
        return [str(s) for s in failures if not s.ok]
    wc = torch.randn(8, 6, 3, 3, generator=g)
    cmask = fanin_mask(wc, 0.5, ablate=0.25, generator=g)
    flat = cmask.reshape(8, -1)
    cenc = formats.encode_fanin((wc * cmask).reshape(8, -1), flat, int(flat.sum(1).max()))
    xc = torch.randn(2, 12, 9, 9, generator=g)
    yc = ops.condensed_conv2d(xc, cenc.values, cenc.indices, cenc.rows, None, 8, [3, 3], [2, 2], [1, 1], [1, 1], 2,
                              runtime)
    failures.append(compare("condensed_conv2d", yc, F.conv2d(xc, wc * cmask, None, 2, 1, 1, 2)))
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
