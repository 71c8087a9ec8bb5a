"""The public exporters: each compiles the model first when it is not a `CompiledModel` yet (reference runtime,
``masks`` as `sparsecc.compile` takes them), then writes it with `sparsecc.export`'s writers. Arguments are
checked before anything is compiled."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from sparsecc.api import compile, masked_reference
from sparsecc.compiler.compiled import CompiledModel
from sparsecc.core.errors import ExportError
from sparsecc.core.inputs import Call, example_call
from sparsecc.core.timing import all_cores
from sparsecc.runtimes import signature
from sparsecc.runtimes.onnxruntime import writer as onnx_file
from sparsecc.runtimes.onnxruntime.writer import OnnxExport
from sparsecc.runtimes.tensorrt import writer as tensorrt_engine
from sparsecc.runtimes.triton import writer as triton
from sparsecc.runtimes.triton.writer import TritonExport
from sparsecc.runtimes.tvm import library as tvm_library
from sparsecc.runtimes.tvm.library import TvmExport


def _compiled(model: nn.Module, inputs: "tuple[Tensor, ...] | Call", masks: Optional[Mapping[str, Tensor]],
              narrow: Optional[bool] = None) -> CompiledModel:
    if isinstance(model, CompiledModel):
        dtype = model.__dict__.get("_dtype")
        if dtype is not None:
            # Its condensed layers hold bf16 values and the rest runs under autocast, which the file formats
            # here cannot carry (ONNX runtimes and TVM's importer have no autocast; their CPU bf16 is partial).
            named = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
            raise ExportError(f"this model was compiled with precision={named!r}, "
                              f"which export_onnx / export_tvm / export_tensorrt / export_triton cannot write: "
                              f"pass the model itself (not the compiled one) to export it in fp32 "
                              f"(export_onnx(..., precision='fp16') for half), or keep bf16 with sparsecc.save")
        return model
    call = Call.of(inputs)
    return compile(model, call.args, example_kwargs=dict(call.kwargs) or None, masks=masks, backend="reference",
                   narrow=narrow)


def _reference(model: nn.Module, masks: Optional[Mapping[str, Tensor]]) -> Optional[nn.Module]:
    """What an export must equal: the model as you call it (with ``masks`` applied when given separately);
    None for a `CompiledModel` (its own module, validated against your model, stands in)."""
    if isinstance(model, CompiledModel):
        return None
    return model if masks is None else masked_reference(model, masks)


def export_onnx(model: nn.Module, example_inputs: Any, path: "str | os.PathLike", *, mode: str = "condensed",
                formulation: str = "auto", precision: str = "fp32",
                masks: Optional[Mapping[str, Tensor]] = None, narrow: Optional[bool] = None,
                example_kwargs: Optional[Mapping[str, Any]] = None, dynamic_axes: Any = "auto") -> OnnxExport:
    """Write ``model`` (a `CompiledModel`, or a model with masks, compiled here with ``masks`` and ``narrow``
    as `sparsecc.compile` takes them) as an ONNX file.

    ``mode="condensed"``: each condensed layer as a standard-op formulation (``formulation="auto"`` picks per layer what
    onnxruntime runs fastest, see `sparsecc.runtimes.onnxruntime.forms`: gather over the fan-in, live rows only, or
    dense with zeros where neither pays). ``mode="dense"``: Gemm/MatMul/Conv with the masked weights as initializers
    (explicit zeros), the input of TensorRT's sparse-weight builder; half-sparse weights that are not 2:4 along the axis
    TensorRT reads get a warning each. ``precision="fp16"`` makes weights and inputs/outputs float16.

    ``example_kwargs`` are keyword inputs (``input_ids=``, ``attention_mask=``), with or beside positional
    ``example_inputs`` (``()`` for none). The file's inputs take ``forward``'s parameter names (or the keys),
    its outputs their paths in the output structure (``logits``, ``last_hidden_state``, ``output_0``).
    ``dynamic_axes="auto"``: the batch and every axis that varies with the input length (sequence length,
    spatial size where the model allows) are free, found by torch.export and checked by running the file
    at two other sizes against your model before it is written; ``"batch"``: the batch only (``--static``);
    ``{name: [axes]}``: those axes and the batch.
    """
    path = Path(path)
    onnx_file.check_arguments(path, mode, formulation, precision)
    signature.check_dynamic(dynamic_axes)
    call = example_call(example_inputs, example_kwargs, needed_by="export")
    return onnx_file.write_onnx(_compiled(model, call, masks, narrow).module, call, path, mode=mode,
                                formulation=formulation, precision=precision, dynamic_axes=dynamic_axes,
                                reference=_reference(model, masks))


def export_tvm(model: nn.Module, example_inputs: Any, path: "str | os.PathLike", *,
               masks: Optional[Mapping[str, Tensor]] = None, target: Any = None,
               example_kwargs: Optional[Mapping[str, Any]] = None) -> TvmExport:
    """Write ``model`` (a `CompiledModel`, or a model with masks, compiled here) as a TVM shared library.

    The library runs the model at the example inputs' shapes with the condensed TIR kernels for sparse
    layers, dense convolutions and batched matmuls, and TVM-generated code for the rest; load it with
    `sparsecc.load_tvm` (or TVM alone, see `sparsecc.runtimes.tvm.runner`). ``target`` (a TVM target or its
    dict) defaults to this host's CPU. ``example_kwargs`` are keyword inputs; the library's inputs are named
    after ``forward``'s parameters (or the keys), and the loaded library takes them by keyword too.
    """
    path = Path(path)
    call = example_call(example_inputs, example_kwargs, needed_by="export")
    tvm_library.check_arguments(path, tuple(call.tensors()))
    return tvm_library.write_tvm(_compiled(model, call, masks).module, call, path, target)


def export_tensorrt(model: nn.Module, example_inputs: Any, path: "str | os.PathLike", *, precision: str = "fp16",
                    max_batch: int = 32, masks: Optional[Mapping[str, Tensor]] = None,
                    example_kwargs: Optional[Mapping[str, Any]] = None):
    """Write ``path`` (a serialized engine) and ``path`` with suffix ``.onnx`` (its source). Returns the
    build (which layers were eligible for sparse math and which got a sparse kernel, and the builder log).
    Without a CUDA device or the tensorrt package the ONNX is still written and `RuntimeUnavailableError`
    says where it is and which trtexec command builds the engine elsewhere."""
    path = Path(path)
    tensorrt_engine.check_arguments(path, precision, max_batch)
    call = example_call(example_inputs, example_kwargs, needed_by="export")
    return tensorrt_engine.write_tensorrt(_compiled(model, call, masks).module, call, path, precision, max_batch)


def export_triton(model: nn.Module, example_inputs: Any, repo_dir: "str | os.PathLike", name: str, *,
                  formats: tuple[str, ...] = ("onnx",), max_batch_size: int = 8, instances: int = 1,
                  threads: Optional[int] = None, mode: str = "condensed", precision: str = "fp32",
                  masks: Optional[Mapping[str, Tensor]] = None, narrow: Optional[bool] = None,
                  example_kwargs: Optional[Mapping[str, Any]] = None, dynamic_axes: Any = "auto") -> TritonExport:
    """Write ``model`` into a Triton Inference Server model repository ``repo_dir`` (created if missing).

    ``formats``: ``"onnx"`` → ``repo_dir/name/`` for Triton's onnxruntime backend (CPU instances, ``threads``
    intra-op threads each, every core by default; ``mode`` / ``precision`` as `export_onnx`); ``"tensorrt"`` →
    ``repo_dir/name_tensorrt/`` with ``model.plan`` built from the dense fp16 ONNX (GPU instances; needs CUDA
    and TensorRT here). Each model gets ``config.pbtxt`` (inputs and outputs with their dtypes and dims after
    the dynamic batch dimension, ``max_batch_size``, dynamic batching, ``instances`` per instance group) and the
    next version directory. The ONNX is checked in onnxruntime against ``model`` as you run it at batch 1 and
    ``max_batch_size`` before anything is written. Names, keyword inputs and free axes as `export_onnx`: the
    config names the inputs and outputs as the file does, ``-1`` for every free axis. See docs/serving.md.
    """
    repo = Path(repo_dir)
    triton.check_arguments(repo, name, tuple(formats), max_batch_size, instances, mode, precision)
    signature.check_dynamic(dynamic_axes)
    call = example_call(example_inputs, example_kwargs, needed_by="export")
    compiled = _compiled(model, call, masks, narrow)
    # what the ONNX must equal: the model as you call it (with ``masks`` applied when they are given separately)
    reference = _reference(model, masks) or model
    if isinstance(reference, CompiledModel):    # it checks calls against its example shapes; its module does not
        reference = reference.module
    return triton.write_triton(compiled.module, reference, call, repo, name, tuple(formats), max_batch_size, instances,
                               threads or all_cores(), mode, precision, dynamic_axes)
