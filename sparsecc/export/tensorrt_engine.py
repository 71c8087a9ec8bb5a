"""`export_tensorrt`: the dense-mode ONNX (always written) and, on a machine with a GPU, a TensorRT engine
built from it with sparse weights (`sparsecc.runtimes.tensorrt`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import Tensor, nn

from sparsecc.errors import InputError
from sparsecc.export.onnx_file import export_onnx, tensor_inputs


def export_tensorrt(model: nn.Module, example_inputs: Any, path: "str | os.PathLike", *, precision: str = "fp16",
                    max_batch: int = 32, masks: Optional[Mapping[str, Tensor]] = None):
    """Write ``path`` (a serialized engine) and ``path`` with suffix ``.onnx`` (its source). Returns the
    build (which layers were eligible for sparse math and which got a sparse kernel, and the builder log).
    Without a CUDA device or the tensorrt package the ONNX is still written and `RuntimeUnavailableError`
    says where it is and which trtexec command builds the engine elsewhere."""
    from sparsecc.runtimes import tensorrt

    if not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(f"max_batch={max_batch!r}: give a positive integer")
    engine_path = Path(path)
    if engine_path.suffix == ".onnx":
        raise InputError(f"{engine_path} is the engine path; its ONNX source is written beside it as .onnx")
    inputs = tensor_inputs(example_inputs)
    exported = export_onnx(model, inputs, engine_path.with_suffix(".onnx"), mode="dense", precision=precision,
                           masks=masks)
    return tensorrt.build(exported.path, engine_path, exported.input_names, inputs, max_batch)
