"""A 90% SRigL-style torchvision model at ``precision="bf16"``, with and without ``fuse=``, beside dense PyTorch
fp32 and OpenVINO's default (bf16 where the CPU has it), at 1 thread and every core: one process, interleaved
rounds (the order reversed every other round, each method's turn opened by untimed calls: `timing.SETTLE`),
medians. Every output is checked against the dense model first.

    .venv/bin/python examples/fuse_vs_openvino.py vit_b_16 --precision bf16 --rounds 12

Needs the ``peers`` extra (openvino), which ``make test`` installs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sparsecc
from sparsecc.core.compare import compare
from sparsecc.core.timing import SETTLE
from sparsecc.runtimes import cpu
from sparsecc.tooling import peers
from sparsecc.tooling.demo import sparse_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="vit_b_16", choices=["vit_b_16", "resnet50", "resnet18"])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    counts = sorted({1, os.cpu_count() or 1})
    torch.manual_seed(0)
    model = sparse_model(args.model, 0.9, 0.05, structure="fanin")
    x = torch.randn(1, 3, 224, 224)
    dense = sparsecc.masked_reference(model)
    plain = sparsecc.compile(model, (x,), precision=args.precision)
    fused = sparsecc.compile(model, (x,), precision=args.precision, fuse=counts)
    print(f"CPU: {cpu.describe()}")
    for note in fused.report.notes:
        if note.startswith("fuse at"):
            print(note)
    print(f"| model | threads | dense fp32 | sparsecc {args.precision} | sparsecc {args.precision} fused | "
          f"OpenVINO default |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for threads in counts:
            torch.set_num_threads(threads)
            found = peers.peers(model, (x,), Path(tmp), threads)
            openvino = next(p for p in found if p.label.startswith("OpenVINO default"))
            if openvino.fn is None:
                raise SystemExit(f"OpenVINO is not available here: {openvino.unavailable}")
            fns = {"dense": dense, "plain": plain, "fused": fused, "openvino": openvino.fn}
            with torch.no_grad():
                expected = dense(x)
                for name, fn in fns.items():
                    tolerance = peers.tolerance(openvino.precision) if name == "openvino" else (
                        None if args.precision == "fp32" else 0.1)
                    stat = compare(name, fn(x), expected, tolerance)
                    if not stat.ok:
                        raise SystemExit(f"{name} differs from the dense model: {stat}")
                samples: dict[str, list[float]] = {name: [] for name in fns}
                for fn in fns.values():
                    fn(x)
                for i in range(args.rounds):
                    for name, fn in (list(fns.items())[::-1] if i % 2 else fns.items()):
                        for _ in range(SETTLE):     # untimed: the previous method's thread pool winds down
                            fn(x)
                        start = time.perf_counter()
                        fn(x)
                        samples[name].append(time.perf_counter() - start)
            t = {name: statistics.median(s) for name, s in samples.items()}
            cells = [f"{t[n] * 1e3:.1f} ms ({t['dense'] / t[n]:.2f}x)" for n in ("plain", "fused", "openvino")]
            print(f"| {args.model} 90% | {threads} | {t['dense'] * 1e3:.1f} ms | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
