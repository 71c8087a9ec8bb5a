"""TensorRT engines: the dense-mode ONNX (always written) and, on a machine with a GPU, an engine built from it
with sparse weights (`sparsecc.runtimes.tensorrt.engine`)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from sparsecc.core.errors import InputError
from sparsecc.core.inputs import Call
from sparsecc.runtimes.onnxruntime.writer import check_arguments as check_onnx, write_onnx


def check_arguments(path: Path, precision: str, max_batch: int) -> None:
    if not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(f"max_batch={max_batch!r}: give a positive integer")
    if path.suffix == ".onnx":
        raise InputError(f"{path} is the engine path; its ONNX source is written beside it as .onnx")
    check_onnx(path.with_suffix(".onnx"), "dense", "auto", precision)


def write_tensorrt(module: nn.Module, inputs: "tuple[Tensor, ...] | Call", path: Path, precision: str,
                   max_batch: int):
    """The dense-mode ONNX of a compiled model's condensed module beside ``path`` (inputs named as the model's, keyword
    inputs included), then the engine at ``path`` (see `sparsecc.export_tensorrt`)."""
    from sparsecc.runtimes.tensorrt import engine as tensorrt

    check_arguments(path, precision, max_batch)
    call = Call.of(inputs)
    exported = write_onnx(module, call, path.with_suffix(".onnx"), mode="dense", precision=precision)
    return tensorrt.build(exported.path, path, exported.input_names, tuple(call.tensors()), max_batch)
