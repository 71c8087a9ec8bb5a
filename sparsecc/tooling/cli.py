"""The ``sparsecc`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsecc", description="sparse-model compiler for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("demo", "compile, validate and time an SRigL-style sparse torchvision model"),
                        ("inspect", "print the per-layer structure report of your model (MODEL) or of an "
                                    "SRigL-style sparse torchvision model")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--model", default="vit_b_16", choices=["vit_b_16", "resnet18", "resnet50"])
        c.add_argument("--sparsity", type=float, default=0.9)
        c.add_argument("--ablate", type=float, default=0.05, help="fraction of neurons ablated per layer")
    _user_model_arguments(sub.choices["inspect"])
    demo = sub.choices["demo"]
    demo.add_argument("--backend", default="auto")
    demo.add_argument("--runs", type=int, default=10)
    demo.add_argument("--threads", type=int, nargs="*", default=None,
                      help="thread counts to time at, side by side (default: 1 and every core)")
    demo.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: condensed layers in "
                      "bf16, the rest under autocast, validated against the fp32 model (default: fp32)")
    demo.add_argument("--no-autotune", action="store_true", help="run every layer's sparse kernel, even where "
                      "its dense op measures faster")
    demo.add_argument("--fuse", action="store_true", help="also have inductor fuse the dense remainder at each "
                      "thread count (`compile(fuse=)`; kept where measured faster, the report says)")
    export = sub.add_parser("export", help="write an SRigL-style or 2:4 sparse torchvision model as ONNX (.onnx), "
                            "as a TVM library that runs without PyTorch (.so), or into a Triton model repository")
    export.add_argument("paths", type=Path, nargs="*", metavar="[MODEL] OUT", help="your model (optional: else "
                        "--model) and the .onnx or .so file to write (with --triton: only MODEL)")
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
    export.add_argument("--static", action="store_true", help="ONNX / Triton: only the batch axis free (default: "
                        "also every axis that varies with the input length, checked at other sizes)")
    export.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="ONNX only")
    export.add_argument("--image-size", type=int, default=224, help="input height and width the file is built "
                        "for (a TVM library is specialised on it; a multiple of 16 for vit_b_16)")
    check = sub.add_parser("check-2to4", help="which Gemm/MatMul/Conv weights of an ONNX file TensorRT reads as 2:4")
    check.add_argument("onnx", type=Path)
    sub.add_parser("smoke", help="run every registered op's samples on every runtime that runs it, and every "
                   "engine on a small model: PASS / FAIL / UNAVAILABLE each")
    _bench_parser(sub.add_parser("bench", help="batch-1 latency of condensed layers and models vs peers, at 1 "
                                 "thread and every core; of your model (MODEL); or LLM decode (--llm), a trained "
                                 "encoder (--encoder)"))
    _user_model_arguments(export, model=False)
    return p


def _bench_parser(bench: argparse.ArgumentParser) -> None:
    _user_model_arguments(bench)
    bench.add_argument("--llm", action="store_true", help="only greedy decoding of a Llama-style decoder (12 "
                       "layers, hidden 768) with 2:4 and 50%%/70%% per-row masks: tokens/s dense vs sparsecc")
    bench.add_argument("--encoder", action="store_true", help="only the trained all-MiniLM-L6-v2 encoder "
                       "(90%% fan-in and 2:4) at 16 and 128 tokens")
    bench.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="MODEL: compile it at this "
                       "precision (`compile(precision=)`); the built-in bench's --peers adds bf16 sparsecc rows itself")
    bench.add_argument("--fuse", action="store_true", help="MODEL and --encoder: compile with fuse= at each "
                       "thread count (inductor fuses the dense remainder; kept where measured faster, the report "
                       "says)")
    bench.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="--llm / --encoder: the "
                       "model's dtype (dense runs in it too)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="where results.md/.json and "
                       "latency.png go (MODEL: model.md/.json; --llm / --encoder: llm-DTYPE / encoder-DTYPE.md/.json)")
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
    bench.add_argument("--token-layers", action="store_true", help="only the many-token kernels on single layers "
                       "(ViT-B/16's Linears at 197 tokens, a 3x3 convolution at 14x14): speed-up, FLOP rates, tile")
    bench.add_argument("--peers", action="store_true", help="also time OpenVINO (f32 and its default precision, "
                       "bf16 on AMX / AVX512_BF16 CPUs) beside onnxruntime; needs sparsecc[peers]")
    bench.add_argument("--onnx-formulations", action="store_true", help="only time each ONNX export formulation "
                       "of ViT/ResNet-shaped layers in onnxruntime (the crossovers `formulation='auto'` uses)")


def _user_model_arguments(p: argparse.ArgumentParser, model: bool = True) -> None:
    """MODEL (a Hugging Face model directory, a .pt2 or a torch.save'd nn.Module) and how to read it."""
    if model:
        p.add_argument("user_model", nargs="?", metavar="MODEL", help="your model: a Hugging Face model directory, "
                       "a torch.export .pt2 file or a torch.save'd nn.Module (default: the built-in --model)")
    p.add_argument("--sparsify", metavar="PATTERN", help="attach magnitude masks first: fanin:SPARSITY (e.g. "
                   "fanin:0.9) or 2:4; output layers stay dense")
    p.add_argument("--input-shape", metavar="N,C,...", type=lambda t: tuple(int(v) for v in t.split(",")),
                   help="a float input of this shape instead of the one read from MODEL")
    p.add_argument("--tokens", type=int, default=32, help="token ids per example sequence when MODEL has no "
                   "tokenizer")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "export":
        paths = list(args.paths)
        if not (len(paths) == 2 or len(paths) == 1 and args.triton is None or len(paths) <= 1 and args.triton):
            parser.error("export: give [MODEL] OUT, or --triton REPO_DIR [MODEL]")
        args.out = paths.pop() if args.triton is None else None
        args.user_model = paths.pop() if paths else None
    if args.command == "export" and (args.image_size < 32 or args.model == "vit_b_16" and args.image_size % 16):
        parser.error(f"--image-size {args.image_size}: use at least 32, and a multiple of 16 for vit_b_16 (its "
                     f"patch size)")
    if args.command in ("inspect", "bench", "export") and not args.user_model and (args.sparsify or args.input_shape):
        parser.error("--sparsify and --input-shape apply to your MODEL: give its path")
    from sparsecc.core.errors import SparseccError

    try:
        return COMMANDS[args.command](args)
    except SparseccError as exc:
        print(f"sparsecc: error: {exc}", file=sys.stderr)
        return 2


def _user(args: argparse.Namespace) -> Any:
    """MODEL loaded (and sparsified with ``--sparsify``), with progress on stderr."""
    from sparsecc.tooling import usermodel

    log = usermodel.progress()
    log.info(f"loading {args.user_model}")
    loaded = usermodel.load(args.user_model, args.input_shape, args.tokens)
    log.info(f"loaded {loaded.what}")
    if args.sparsify:
        log.info(f"sparsify {args.sparsify}: {usermodel.sparsify(loaded.model, args.sparsify)} layer(s) masked")
    return loaded


def _sparsecc_label(bf16: bool, fused: bool) -> str:
    """sparsecc's column in a bench table, naming how it was compiled: ``sparsecc (bf16, fused)``."""
    how = [name for name, on in (("bf16", bf16), ("fused", fused)) if on]
    return f"sparsecc ({', '.join(how)})" if how else "sparsecc"


def _bench_user(args: argparse.Namespace) -> int:
    """``sparsecc bench MODEL``: dense vs sparsecc (and ``--peers``) on stdout and in OUT/model.md (+ .json)."""
    import json

    import sparsecc
    from sparsecc.core.timing import THREADS
    from sparsecc.runtimes import cpu
    from sparsecc.tooling import bench_hf, usermodel

    print(f"CPU: {cpu.describe()}")
    loaded = _user(args)
    log = usermodel.progress()
    compiled = sparsecc.compile(loaded.model, loaded.call.args, example_kwargs=loaded.call.kwargs,
                                precision=args.precision, fuse=tuple(args.threads or THREADS) if args.fuse else False)
    print(compiled.report.summary())
    log.info("timing dense vs sparsecc" + (" and the peers" if args.peers else ""))
    dense = sparsecc.masked_reference(loaded.model)
    rows = bench_hf.model(dense, compiled, loaded.call, loaded.what, args.model_runs * 2,
                          tuple(args.threads or THREADS), peers_of=loaded.model if args.peers else None)
    table = bench_hf.model_table(rows, _sparsecc_label(args.precision == "bf16", args.fuse))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model.md").write_text(f"CPU: {cpu.describe()}\n\n{table}\n")
    (args.out / "model.json").write_text(json.dumps(bench_hf.describe(rows), indent=1))
    print(table)
    return 0


def _bench_hf(args: argparse.Namespace) -> int:
    """``--llm`` / ``--encoder``: tables on stdout and in OUT/llm-DTYPE.md, OUT/encoder-DTYPE.md (+ .json)."""
    import json

    from sparsecc.core.timing import THREADS
    from sparsecc.runtimes import cpu
    from sparsecc.tooling import bench_hf, usermodel

    log = usermodel.progress()
    threads = tuple(args.threads or THREADS)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu.describe()}")
    if args.llm:
        rows = bench_hf.llm(max(3, args.model_runs // 2), threads, log=log.info, dtype=args.dtype)
        name, table = f"llm-{args.dtype}", bench_hf.llm_table(rows)
    else:
        rows = bench_hf.encoder(args.model_runs * 2, threads, log=log.info, dtype=args.dtype, fuse=args.fuse)
        name = f"encoder-{args.dtype}" + ("-fused" if args.fuse else "")
        table = bench_hf.model_table(rows, _sparsecc_label(False, args.fuse))
    (args.out / f"{name}.md").write_text(f"CPU: {cpu.describe()}\n\n{table}\n")
    (args.out / f"{name}.json").write_text(json.dumps(bench_hf.describe(rows), indent=1))
    print(table)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sparsecc.core.timing import THREADS
    from sparsecc.tooling import bench

    if args.user_model:
        return _bench_user(args)
    if args.llm or args.encoder:
        return _bench_hf(args)
    if args.token_layers:
        print(bench.token_layer_table(args.model_runs * 3, tuple(args.threads or THREADS)))
    elif args.onnx_formulations:
        print(bench.formulation_table())
    elif args.narrow:
        print(bench.narrow_table(tuple(args.models), args.model_runs))
    else:
        print(bench.run(args.out, args.runs, args.model_runs, tuple(args.models), not args.no_memory,
                        tuple(args.threads or THREADS), tuple(args.structures), args.peers))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sparsecc.tooling import demo

    demo.run(args.model, args.sparsity, args.ablate, args.backend, args.runs, args.threads, not args.no_autotune,
             args.precision, args.fuse)
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    import sparsecc
    from sparsecc.runtimes.tvm import runner as tvm_runner
    from sparsecc.tooling import demo, usermodel

    if args.user_model:
        loaded = _user(args)
        model, example = loaded.model, usermodel.positional(loaded.model, loaded.call)
        # ONNX and Triton take the call as the model takes it: inputs named as the tokenizer names them
        keywords = (loaded.call.args, dict(loaded.call.kwargs) or None)
        name = args.name or Path(args.user_model).stem.replace("-", "_")
    else:
        model = demo.sparse_model(args.model, args.sparsity, args.ablate, structure=args.structure,
                                  image_size=args.image_size)
        example, name = torch.randn(1, 3, args.image_size, args.image_size), args.name or args.model
        keywords = (example, None)
    axes = "batch" if args.static else "auto"
    if args.triton is not None:
        written = sparsecc.export_triton(model, keywords[0], args.triton, name, example_kwargs=keywords[1],
                                         max_batch_size=args.max_batch_size, threads=args.threads, mode=args.mode,
                                         precision=args.precision, dynamic_axes=axes)
        for m in written.models.values():
            print(f"wrote {m.file} (version {m.version}, {m.platform}) and {m.config}; checked in onnxruntime at "
                  f"batch sizes {sorted(m.max_abs_error)}; serve it: tritonserver --model-repository={args.triton}")
        return 0
    if args.out.suffix == ".so":
        library = sparsecc.export_tvm(model, example, args.out)
        print(f"wrote {library.path} ({library.bytes / 2**20:.1f} MiB, TVM, batch 1); kernel calls: "
              f"{library.kernels}; run it without torch: python {tvm_runner.__file__} {library.path}")
        return 0
    result = sparsecc.export_onnx(model, keywords[0], args.out, example_kwargs=keywords[1], mode=args.mode,
                                  precision=args.precision, dynamic_axes=axes)
    counts = {form: list(result.forms.values()).count(form) for form in sorted(set(result.forms.values()))}
    print(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, {args.mode}, {args.precision}); "
          f"inputs {result.input_names}, outputs {result.output_names}; layers by formulation: {counts}")
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
    from sparsecc.tooling import demo

    if args.user_model:
        loaded = _user(args)
        print(sparsecc.inspect(loaded.model, loaded.call.args, example_kwargs=loaded.call.kwargs))
        return 0
    model = demo.sparse_model(args.model, args.sparsity, args.ablate)
    print(sparsecc.inspect(model, (torch.randn(1, 3, 224, 224),)))
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from sparsecc.tooling import smoke

    return smoke.main()


#: Sub-command -> its handler (exit status).
COMMANDS = {"bench": _bench, "demo": _demo, "export": _export, "check-2to4": _check_2to4, "inspect": _inspect,
            "smoke": _smoke}


if __name__ == "__main__":
    sys.exit(main())
