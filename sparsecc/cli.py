"""The ``sparsecc`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsecc", description="sparse-model compiler for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("demo", "compile, validate and time an SRigL-style sparse torchvision model"),
                        ("inspect", "print the per-layer structure report of an SRigL-style sparse model")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--model", default="vit_b_16", choices=["vit_b_16", "resnet18", "resnet50"])
        c.add_argument("--sparsity", type=float, default=0.9)
        c.add_argument("--ablate", type=float, default=0.05, help="fraction of neurons ablated per layer")
    demo = sub.choices["demo"]
    demo.add_argument("--backend", default="auto")
    demo.add_argument("--runs", type=int, default=10)
    demo.add_argument("--threads", type=int, default=1)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from sparsecc import demo
    from sparsecc.errors import SparseccError

    try:
        if args.command == "demo":
            demo.run(args.model, args.sparsity, args.ablate, args.backend, args.runs, args.threads)
        else:
            import torch

            import sparsecc

            model = demo.sparse_model(args.model, args.sparsity, args.ablate)
            print(sparsecc.inspect(model, (torch.randn(1, 3, 224, 224),)))
    except SparseccError as exc:
        print(f"sparsecc: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
