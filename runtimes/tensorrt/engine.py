"""TensorRT engine (optional extra ``sparsecc[tensorrt]``, NVIDIA GPU): the dense-mode ONNX, fp16, built with
``BuilderFlag.SPARSE_WEIGHTS`` so 2:4 weights can run on sparse tensor cores.

Built from ONNX with TensorRT's own parser rather than through torch_tensorrt: the ONNX file is the artefact
users deploy (trtexec, Triton), `check_2to4` inspects exactly what the builder reads, and the builder log,
which says which layers were eligible for sparse math and which got a sparse kernel, is ours to capture.
The network is strongly typed (TensorRT 10+), so precision comes from the ONNX dtypes: fp16 weights and IO.
Without a CUDA device nothing is built: the error names what is missing, where the ONNX file is, and the
trtexec command that builds the engine on a GPU machine (``--sparsity=enable``, never ``force``: force keeps
the first 2 of every 4 weights, not the largest).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.core.errors import RuntimeUnavailableError
from sparsecc.core.files import atomic_write
from sparsecc.core.inputs import Arrangement
from sparsecc.runtimes import file_inputs, refuse_grad

NAME = "tensorrt"
#: What this engine is fed: `export_onnx` arguments.
EXPORT = {"mode": "dense", "precision": "fp16"}
OPTIONS = ("max_batch", "onnx_path", "engine_path")
KEEPS_FILE = True       # the file is what the no-GPU error points users to
MAX_BATCH = 32
_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)")


def missing() -> list[str]:
    """What this machine lacks for TensorRT, empty when it can build and run engines."""
    lacks = []
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the package is unusable
        lacks.append(f"the tensorrt package ({type(exc).__name__}: {exc}; pip install 'sparsecc[tensorrt]')")
    if not torch.cuda.is_available():
        lacks.append("a CUDA device (torch.cuda.is_available() is False)")
    return lacks


def unavailable() -> Optional[str]:
    lacks = missing()
    return f"TensorRT needs {' and '.join(lacks)}" if lacks else None


def trtexec_command(onnx_path: "str | os.PathLike", engine_path: "str | os.PathLike") -> str:
    """The command that builds the same engine on a GPU machine."""
    return f"trtexec --onnx={onnx_path} --sparsity=enable --fp16 --saveEngine={engine_path}"


def sparsity_lines(log: list[str]) -> tuple[list[str], list[str]]:
    """Layers the builder found eligible for sparse math, and those it gave a sparse implementation."""
    eligible: list[str] = []
    picked: list[str] = []
    for line in log:
        for pattern, into in ((_ELIGIBLE, eligible), (_PICKED, picked)):
            match = pattern.search(line)
            if match:
                into.extend(name.strip() for name in match.group(1).split(",") if name.strip())
    return eligible, picked


@dataclass(frozen=True)
class Profile:
    """One optimisation profile entry: an input's shapes at batch 1, the example batch, and ``max_batch``."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profiles(input_names: list[str], example_inputs: tuple[Tensor, ...], max_batch: int) -> list[Profile]:
    """Dynamic batch: TensorRT needs the range of every input's shape up front."""
    found = []
    for name, t in zip(input_names, example_inputs):
        rest = tuple(t.shape[1:])
        found.append(Profile(name, (1, *rest), (max(1, min(t.shape[0], max_batch)), *rest), (max_batch, *rest)))
    return found


def configure(trt: Any, builder: Any, network: Any, entries: list[Profile]) -> Any:
    """The builder configuration: sparse weights on, one dynamic-batch profile. No precision flags: the
    network is strongly typed and takes its precision from the ONNX."""
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    for entry in entries:
        profile.set_shape(entry.name, entry.min, entry.opt, entry.max)
    config.add_optimization_profile(profile)
    return config


def network_flags(trt: Any) -> int:
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


@dataclass
class EngineBuild:
    engine_path: Path
    onnx_path: Path
    eligible: list[str] = field(default_factory=list)    # layers eligible for sparse math
    picked: list[str] = field(default_factory=list)      # layers that got a sparse implementation
    log: list[str] = field(default_factory=list)


def _logger(trt: Any, lines: list[str]) -> Any:
    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:  # noqa: A003 - TensorRT's interface
            lines.append(f"[{severity.name if hasattr(severity, 'name') else severity}] {msg}")

    return Capture()


def build(onnx_path: Path, engine_path: Path, input_names: list[str], example_inputs: tuple[Tensor, ...],
          max_batch: int = MAX_BATCH) -> EngineBuild:
    """Parse the ONNX, build the engine with sparse weights, write it atomically; raises without a GPU."""
    lacks = missing()
    if lacks:
        raise RuntimeUnavailableError(
            f"cannot build a TensorRT engine here: this machine lacks {' and '.join(lacks)}. The ONNX file is "
            f"ready at {onnx_path}; on a machine with an NVIDIA GPU and TensorRT run: "
            f"{trtexec_command(onnx_path, engine_path)}")
    import tensorrt as trt

    lines: list[str] = []
    logger = _logger(trt, lines)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeUnavailableError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = configure(trt, builder, network, profiles(input_names, example_inputs, max_batch))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeUnavailableError(f"TensorRT failed to build an engine from {onnx_path}; log tail: "
                                      + " | ".join(lines[-5:]))
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(serialized))
    eligible, picked = sparsity_lines(lines)
    return EngineBuild(engine_path, onnx_path, eligible, picked, lines)


class EngineModule(nn.Module):
    """Runs a serialized engine on CUDA tensors: inputs are cast to the engine's dtypes and moved to the GPU,
    outputs come back as the caller's device and the original output dtype."""

    def __init__(self, engine_path: Path, outputs: pytree.TreeSpec, out_dtype: torch.dtype,
                 arrangement: Optional[Arrangement] = None) -> None:
        super().__init__()
        self.arrangement = arrangement     # how the model's calls map to the engine's inputs (None: positional)
        import tensorrt as trt

        self._trt = trt
        lines: list[str] = []
        self._runtime = trt.Runtime(_logger(trt, lines))
        self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs_names = [n for n in names if n not in self.inputs]
        self.outputs, self.out_dtype = outputs, out_dtype

    def _torch_dtype(self, name: str) -> torch.dtype:
        return {self._trt.DataType.HALF: torch.float16, self._trt.DataType.FLOAT: torch.float32,
                self._trt.DataType.INT32: torch.int32, self._trt.DataType.INT64: torch.int64}[
            self._engine.get_tensor_dtype(name)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = file_inputs(self.arrangement, args, kwargs, self.inputs, NAME)
        refuse_grad(NAME, inputs)
        device = inputs[0].device
        stream = torch.cuda.current_stream()
        keep = []
        for name, t in zip(self.inputs, inputs):
            t = t.to("cuda", self._torch_dtype(name)).contiguous()
            keep.append(t)
            self._context.set_input_shape(name, tuple(t.shape))
            self._context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs_names:
            out = torch.empty(tuple(self._context.get_tensor_shape(name)), dtype=self._torch_dtype(name),
                              device="cuda")
            self._context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeUnavailableError("TensorRT execution failed (execute_async_v3 returned False)")
        stream.synchronize()
        return pytree.tree_unflatten([o.to(device, self.out_dtype) for o in outs], self.outputs)


def load(onnx_path: Path, input_names: list[str], outputs: pytree.TreeSpec, *, example_inputs: tuple[Tensor, ...],
         max_batch: int = MAX_BATCH, engine_path: Optional["str | os.PathLike"] = None,
         arrangement: Optional[Arrangement] = None, **_: Any) -> nn.Module:
    """Build the engine next to the ONNX file (or at ``engine_path``) and return it as a module, called as the
    model is (``arrangement``: keyword inputs by name)."""
    engine = Path(engine_path) if engine_path else Path(onnx_path).with_suffix(".engine")
    build(Path(onnx_path), engine, input_names, example_inputs, max_batch)
    floating = [t.dtype for t in example_inputs if t.is_floating_point()]
    return EngineModule(engine, outputs, floating[0] if floating else torch.float32, arrangement)
