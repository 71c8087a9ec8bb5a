"""A Triton Inference Server model repository: ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/<version>/model.onnx``
(Triton's onnxruntime backend, CPU), or ``model.plan`` in ``REPO/<name>_tensorrt/`` (its TensorRT backend, GPU).

The ONNX is the file `write_onnx` validates; before anything lands in the repository it is run in
onnxruntime with the thread settings the config gives Triton's onnxruntime backend, at batch 1 and at
``max_batch_size``, against the model the user runs. Each export adds the next version directory (built
under a temporary name, then renamed) and rewrites the config atomically; an argument or a directory that is
not a repository is refused before anything is written.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.core.errors import ExportError, InputError, RuntimeUnavailableError
from sparsecc.core.files import atomic_write
from sparsecc.core.inputs import Call
from sparsecc.runtimes.onnxruntime.writer import cast_to, check_arguments as check_onnx, file_tolerance, write_onnx
from sparsecc.runtimes.signature import tensor_leaves

FORMATS = {"onnx": ("onnxruntime_onnx", "model.onnx", ""), "tensorrt": ("tensorrt_plan", "model.plan", "_tensorrt")}
#: ONNX element type -> Triton data type (model_config.proto's DataType).
DATA_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64",
              9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class TritonModel:
    """One model directory written: its config, the version added, the file in it, and the check results."""

    directory: Path
    config: Path
    version: int
    file: Path
    platform: str
    max_abs_error: dict[int, float] = field(default_factory=dict)    # batch size -> max |onnx - user's model|


@dataclass
class TritonExport:
    repository: Path
    models: dict[str, TritonModel]      # format -> model


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ExportError(f"model name {name!r}: use letters, digits, '_', '-' and '.' (no '/', not starting "
                          f"with '.'); it becomes a directory of the repository")


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and all(p.name == "config.pbtxt" or (p.is_dir() and p.name.isdigit())
                                 or p.name.startswith(".") for p in path.iterdir())


def check_repository(repo: Path) -> None:
    """Refuse a repository path that is a file, or an existing directory holding anything but model directories
    (a file, a directory with files other than a config and version directories)."""
    if repo.exists() and not repo.is_dir():
        raise ExportError(f"{repo} is a file; give a directory for the Triton model repository")
    if not repo.exists():
        if not repo.parent.is_dir():
            raise ExportError(f"cannot create {repo}: directory {repo.parent} does not exist")
        return
    strays = [p.name for p in repo.iterdir() if not p.name.startswith(".") and not _is_model_dir(p)]
    if strays:
        raise ExportError(f"{repo} is not a Triton model repository (it holds {', '.join(sorted(strays)[:3])}, "
                          f"which are not model directories); give an empty or new directory")


def check_arguments(repo: Path, name: str, formats: tuple[str, ...], max_batch_size: int, instances: int,
                    mode: str, precision: str) -> None:
    check_name(name)
    unknown = sorted(set(formats) - set(FORMATS))
    if not formats or unknown:
        raise InputError(f"formats={formats!r}: choose from {sorted(FORMATS)}")
    for what, value in (("max_batch_size", max_batch_size), ("instances", instances)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{what}={value!r}: give a positive integer")
    if "tensorrt" in formats:
        from sparsecc.runtimes import unavailable

        why = unavailable("tensorrt")
        if why is not None:
            raise RuntimeUnavailableError(f"formats includes 'tensorrt', which needs a GPU build: {why}. Export "
                                          f"formats=('onnx',) here, or run the export on a machine with CUDA")
    check_repository(repo)
    check_onnx((repo if repo.is_dir() else repo.parent) / "model.onnx", mode, "auto", precision)


def _dims(value: Any) -> list[int]:
    """A graph value's dims after the batch dimension (-1 where symbolic)."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else -1 for d in list(dims)[1:]]


def _tensors(values: Any) -> list[tuple[str, str, list[int]]]:
    out = []
    for v in values:
        elem = v.type.tensor_type.elem_type
        if elem not in DATA_TYPES:
            raise ExportError(f"{v.name}: ONNX element type {elem} has no Triton data type")
        out.append((v.name, DATA_TYPES[elem], _dims(v)))
    return out


def _io(kind: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    entries = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, d))} ]\n  }}'
                         for n, t, d in tensors)
    return f"{kind} [\n{entries}\n]\n"


def config_text(name: str, platform: str, graph: Any, max_batch_size: int, instances: int, threads: int,
                gpu: bool) -> str:
    """``config.pbtxt`` (protobuf text format of Triton's ModelConfig) for an ONNX graph's inputs and outputs."""
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    text = (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
            + _io("input", _tensors(graph.input)) + _io("output", _tensors(graph.output))
            + "dynamic_batching {\n  max_queue_delay_microseconds: 100\n}\n"
            + f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n")
    if not gpu:   # the onnxruntime backend's session threads (Triton's default is every core per instance)
        for key, value in (("intra_op_thread_count", threads), ("inter_op_thread_count", 1)):
            text += f'parameters {{\n  key: "{key}"\n  value: {{\n    string_value: "{value}"\n  }}\n}}\n'
    return text


def _batch(inputs: Call, size: int, seed: int) -> Call:
    """The call at batch ``size``: floats drawn from N(0,1), other dtypes the first sample repeated."""
    g = torch.Generator().manual_seed(seed)

    def one(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.dim():
            return t
        if t.is_floating_point():
            return torch.randn(size, *t.shape[1:], generator=g).to(t.dtype)
        return t[:1].expand(size, *t.shape[1:]).clone()

    return Call(tuple(pytree.tree_map(one, a) for a in inputs.args),
                {k: pytree.tree_map(one, v) for k, v in inputs.kwargs.items()})


def check_in_onnxruntime(path: Path, input_names: list[str], reference: Callable, inputs: "Call | tuple",
                         batches: tuple[int, ...], threads: int, precision: str) -> dict[int, float]:
    """Run the ONNX as Triton's onnxruntime backend would (same intra-op threads) at each batch size and compare
    with ``reference``; an `ExportError` names the first mismatch. Returns the max abs error per batch size."""
    from sparsecc.core.compare import compare
    from sparsecc.runtimes.onnxruntime.engine import session

    sess = session(path, threads)
    # inputs as the file takes them, outputs checked at its precision (`cast_to`, `file_tolerance`)
    dtype, tolerance = cast_to(precision), file_tolerance(precision)
    errors = {}
    for i, size in enumerate(batches):
        call = _batch(Call.of(inputs), size, seed=i)
        with torch.no_grad():
            expected = [t for t in pytree.tree_leaves(call(reference)) if isinstance(t, Tensor)]
        feed = {n: a.to(dtype).numpy() if a.is_floating_point() and dtype is not None else a.numpy()
                for n, a in zip(input_names, tensor_leaves(call))}
        got = [torch.from_numpy(o) for o in sess.run(None, feed)]
        unbatched = [j for j, g in enumerate(got) if g.dim() == 0 or g.shape[0] != size]
        if unbatched:
            raise ExportError(f"output {unbatched[0]} has shape {tuple(got[unbatched[0]].shape)} at batch {size}: "
                              f"Triton's batching needs the batch dimension first in every output")
        stats = [compare(f"output {j} at batch {size}", g.to(e.dtype), e, tolerance)
                 for j, (g, e) in enumerate(zip(got, expected))]
        bad = [s for s in stats if not s.ok]
        if len(got) != len(expected) or bad:
            raise ExportError(f"the ONNX for Triton differs from your model in onnxruntime: "
                              f"{bad[0] if bad else f'{len(got)} outputs, expected {len(expected)}'}")
        errors[size] = max((s.max_abs for s in stats), default=0.0)
    return errors


def _next_version(directory: Path) -> int:
    versions = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()] \
        if directory.is_dir() else []
    return max(versions, default=0) + 1


def _publish(directory: Path, file_name: str, source: Path, config: str) -> tuple[int, Path]:
    """Add ``source`` as the next version of the model in ``directory`` and write its config, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
    try:
        shutil.copyfile(source, staging / file_name)
        version = _next_version(directory)
        staging.rename(directory / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write(directory / "config.pbtxt", lambda tmp: Path(tmp).write_text(config))
    return version, directory / str(version) / file_name


def _build(fmt: str, module: nn.Module, reference: Callable, inputs: Call, folder: Path,
           max_batch_size: int, threads: int, mode: str, precision: str,
           dynamic_axes: Any = "auto") -> tuple[Path, Any, dict[int, float]]:
    """The file of one format in ``folder``, its ONNX graph, and its errors in onnxruntime per batch size. TensorRT
    is built from the dense fp16 ONNX (the form its sparse-weight builder reads), checked in onnxruntime first."""
    import onnx

    if fmt == "tensorrt":
        mode, precision = "dense", "fp16"
    exported = write_onnx(module, inputs, folder / f"{fmt}.onnx", mode=mode, precision=precision,
                          dynamic_axes=dynamic_axes if fmt == "onnx" else "batch", reference=reference)
    errors = check_in_onnxruntime(exported.path, exported.input_names, reference, inputs,
                                  tuple(sorted({1, max_batch_size})), threads, precision)
    graph = onnx.load(str(exported.path)).graph
    if fmt == "onnx":
        return exported.path, graph, errors
    from sparsecc.runtimes.tensorrt import engine as tensorrt

    tensorrt.build(exported.path, folder / "model.plan", exported.input_names, tuple(tensor_leaves(inputs)),
                   max_batch_size)
    return folder / "model.plan", graph, errors


def write_triton(module: nn.Module, reference: Callable, inputs: "Call | tuple", repo: Path, name: str,
                 formats: tuple[str, ...], max_batch_size: int, instances: int, threads: int, mode: str,
                 precision: str, dynamic_axes: Any = "auto") -> TritonExport:
    """Write the repository entries of a compiled model's condensed module (see `sparsecc.export_triton`);
    ``reference`` is the model the user runs, callable at any size.
    Every file is built and checked before the first one lands in the repository."""
    check_arguments(repo, name, formats, max_batch_size, instances, mode, precision)
    models = {}
    with tempfile.TemporaryDirectory(prefix="sparsecc-triton-") as tmp:
        built = {fmt: _build(fmt, module, reference, Call.of(inputs), Path(tmp), max_batch_size, threads, mode,
                             precision, dynamic_axes) for fmt in formats}
        repo.mkdir(exist_ok=True)
        for fmt, (source, graph, errors) in built.items():
            platform, file_name, suffix = FORMATS[fmt]
            directory = repo / f"{name}{suffix}"
            gpu = fmt == "tensorrt"
            config = config_text(directory.name, platform, graph, max_batch_size, instances, threads, gpu)
            version, path = _publish(directory, file_name, source, config)
            models[fmt] = TritonModel(directory, directory / "config.pbtxt", version, path, platform, errors)
    return TritonExport(repo, models)
