"""The ``sparsecc`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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
    demo.add_argument("--threads", type=int, nargs="*", default=None,
                      help="thread counts to time at, side by side (default: 1 and every core)")
    demo.add_argument("--no-autotune", action="store_true", help="run every layer's sparse kernel, even where "
                      "its dense op measures faster")
    export = sub.add_parser("export", help="write an SRigL-style or 2:4 sparse torchvision model as ONNX (.onnx), "
                            "as a TVM library that runs without PyTorch (.so), or into a Triton model repository")
    export.add_argument("out", type=Path, nargs="?", help="the .onnx or .so file to write (not with --triton)")
    export.add_argument("--triton", type=Path, metavar="REPO_DIR", help="write a Triton Inference Server model "
                        "repository entry instead: REPO_DIR/NAME/config.pbtxt and REPO_DIR/NAME/<version>/model.onnx")
    export.add_argument("--name", help="the Triton model name (default: --model)")
    export.add_argument("--max-batch-size", type=int, default=8, help="Triton's max_batch_size")
    export.add_argument("--threads", type=int, default=None, help="intra-op threads per Triton CPU instance "
                        "(default: every core)")
    export.add_argument("--model", default="vit_b_16", choices=["vit_b_16", "resnet18", "resnet50"])
    export.add_argument("--structure", default="fanin", choices=["fanin", "2:4"])
    export.add_argument("--sparsity", type=float, default=0.9, help="fan-in sparsity (ignored for 2:4)")
    export.add_argument("--ablate", type=float, default=0.05, help="fraction of neurons ablated (fan-in)")
    export.add_argument("--mode", default="condensed", choices=["condensed", "dense"], help="ONNX only")
    export.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="ONNX only")
    export.add_argument("--image-size", type=int, default=224, help="input height and width the file is built "
                        "for (a TVM library is specialised on it; a multiple of 16 for vit_b_16)")
    check = sub.add_parser("check-2to4", help="which Gemm/MatMul/Conv weights of an ONNX file TensorRT reads as 2:4")
    check.add_argument("onnx", type=Path)
    bench = sub.add_parser("bench", help="batch-1 latency of condensed layers and models vs peers, at 1 thread "
                           "and every core")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="where results.md/.json and "
                       "latency.png go")
    bench.add_argument("--runs", type=int, default=200, help="timed rounds per layer configuration")
    bench.add_argument("--model-runs", type=int, default=10, help="timed rounds per end-to-end model")
    bench.add_argument("--models", nargs="*", default=["vit_b_16", "resnet50"])
    bench.add_argument("--no-memory", action="store_true", help="skip the resident-memory subprocesses")
    bench.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts (default: 1 and every "
                       "core)")
    bench.add_argument("--structures", nargs="*", default=["fanin", "2:4"], choices=["fanin", "2:4"],
                       help="mask structures of the end-to-end models")
    bench.add_argument("--narrow", action="store_true", help="only time condensed vs condensed + physically "
                       "narrower models (30%% of neurons ablated)")
    bench.add_argument("--onnx-formulations", action="store_true", help="only time each ONNX export formulation "
                       "of ViT/ResNet-shaped layers in onnxruntime (the crossovers `formulation='auto'` uses)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "export" and (args.out is None) == (args.triton is None):
        parser.error("export: give either an output file or --triton REPO_DIR")
    if args.command == "export" and (args.image_size < 32 or args.model == "vit_b_16" and args.image_size % 16):
        parser.error(f"--image-size {args.image_size}: use at least 32, and a multiple of 16 for vit_b_16 (its "
                     f"patch size)")
    from sparsecc.errors import SparseccError

    try:
        return COMMANDS[args.command](args)
    except SparseccError as exc:
        print(f"sparsecc: error: {exc}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from sparsecc import bench
    from sparsecc.timing import THREADS

    if args.onnx_formulations:
        print(bench.formulation_table())
    elif args.narrow:
        print(bench.narrow_table(tuple(args.models), args.model_runs))
    else:
        print(bench.run(args.out, args.runs, args.model_runs, tuple(args.models), not args.no_memory,
                        tuple(args.threads or THREADS), tuple(args.structures)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sparsecc import demo

    demo.run(args.model, args.sparsity, args.ablate, args.backend, args.runs, args.threads, not args.no_autotune)
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    import sparsecc
    from sparsecc import demo
    from sparsecc.export import tvm_runner

    model = demo.sparse_model(args.model, args.sparsity, args.ablate, structure=args.structure,
                              image_size=args.image_size)
    example = torch.randn(1, 3, args.image_size, args.image_size)
    if args.triton is not None:
        written = sparsecc.export_triton(model, example, args.triton, args.name or args.model,
                                         max_batch_size=args.max_batch_size, threads=args.threads, mode=args.mode,
                                         precision=args.precision)
        for m in written.models.values():
            print(f"wrote {m.file} (version {m.version}, {m.platform}) and {m.config}; checked in onnxruntime at "
                  f"batch sizes {sorted(m.max_abs_error)}; serve it: tritonserver --model-repository={args.triton}")
        return 0
    if args.out.suffix == ".so":
        library = sparsecc.export_tvm(model, example, args.out)
        print(f"wrote {library.path} ({library.bytes / 2**20:.1f} MiB, TVM, batch 1); kernel calls: "
              f"{library.kernels}; run it without torch: python {tvm_runner.__file__} {library.path}")
        return 0
    result = sparsecc.export_onnx(model, example, args.out, mode=args.mode, precision=args.precision)
    counts = {form: list(result.forms.values()).count(form) for form in sorted(set(result.forms.values()))}
    print(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, {args.mode}, {args.precision}); "
          f"layers by formulation: {counts}")
    return 0


def _check_2to4(args: argparse.Namespace) -> int:
    import sparsecc

    entries = sparsecc.check_2to4(args.onnx)
    for entry in entries:
        print(entry)
    print(f"{sum(e.ok for e in entries)} of {len(entries)} weights are 2:4 where TensorRT reads them")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import torch

    import sparsecc
    from sparsecc import demo

    model = demo.sparse_model(args.model, args.sparsity, args.ablate)
    print(sparsecc.inspect(model, (torch.randn(1, 3, 224, 224),)))
    return 0


#: Sub-command -> its handler (exit status).
COMMANDS = {"bench": _bench, "demo": _demo, "export": _export, "check-2to4": _check_2to4, "inspect": _inspect}


if __name__ == "__main__":
    sys.exit(main())
