"""What a user would run instead of sparsecc, on the same model and input, for `sparsecc bench --peers`.

- onnxruntime on the masked model exported dense (explicit zeros) and condensed (`export_onnx`'s formulations);
- OpenVINO on the dense ONNX file twice: with ``INFERENCE_PRECISION_HINT=f32``, and with its default
  precision, which is bf16 on CPUs with AMX or AVX512_BF16 (the OpenVINO a user installs picks it silently).

Every peer gets the benchmark's thread count (``INFERENCE_NUM_THREADS`` / intra-op threads) and says its
precision, so a table never compares a bf16 peer with fp32 sparsecc without saying so. OpenVINO is the optional
extra ``sparsecc[peers]``; without it its rows are reported unavailable with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

import sparsecc
from sparsecc.core.errors import SparseccError
from sparsecc.core.inputs import Arrangement, Call
from sparsecc.runtimes import file_inputs
from sparsecc.tooling.usermodel import float_dtype


@dataclass
class Peer:
    """One way to run the model: a callable on the example's tensors, the precision it computes in (``fp32``,
    ``bf16``...), or why it cannot run here."""

    name: str
    precision: str
    fn: Optional[Callable[..., Any]] = None
    unavailable: Optional[str] = None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.precision})"


def openvino_unavailable() -> Optional[str]:
    try:
        import openvino  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the peer is missing
        return f"openvino is not importable ({type(exc).__name__}: {exc}); pip install 'sparsecc[peers]'"
    return None


def _precision_name(value: Any) -> str:
    text = str(value).lower()
    for short, names in (("bf16", ("bf16", "bfloat16")), ("fp16", ("f16", "float16")), ("fp32", ("f32", "float32"))):
        if any(n in text for n in names):
            return short
    return text


class OpenVINOModule(nn.Module):
    """An OpenVINO CPU compiled model called with torch tensors as the model is called (``arrangement``: keyword
    inputs by name, as the exported file takes them), outputs nested like the original model's."""

    def __init__(self, onnx_path: Path, outputs: pytree.TreeSpec, threads: int, precision: Optional[str],
                 input_names: Sequence[str] = (), arrangement: Optional[Arrangement] = None) -> None:
        super().__init__()
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs, self.input_names, self.arrangement = outputs, list(input_names), arrangement
        #: What OpenVINO actually computes in (its default follows the CPU: bf16 with AMX / AVX512_BF16).
        self.precision = _precision_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = file_inputs(self.arrangement, args, kwargs, self.input_names, "OpenVINO") if self.input_names \
            else args
        results = self.request.infer([t.detach().contiguous().numpy() for t in inputs])
        outs = [torch.from_numpy(results[o].copy()) for o in self.compiled.outputs]
        return pytree.tree_unflatten(outs, self.outputs)


def dense_onnx(model: nn.Module, example: "tuple | Call", directory: Path) -> tuple[Path, list[str], pytree.TreeSpec]:
    """The masked model exported dense (explicit zeros): the file both onnxruntime and OpenVINO read."""
    call = example if isinstance(example, Call) else Call(tuple(example))
    exported = sparsecc.export_onnx(model, call.args, directory / "dense.onnx", mode="dense",
                                    example_kwargs=dict(call.kwargs) or None)
    with torch.no_grad():
        outputs = pytree.tree_structure(call(model))
    return exported.path, exported.input_names, outputs


def peers(model: nn.Module, example: "tuple | Call", directory: Path, threads: int, masks: Optional[dict] = None,
          openvino: bool = True) -> list[Peer]:
    """The peers of ``model`` (masked dense, or with ``masks=``) on ``example`` (positional inputs, or a `Call`
    with keyword ones) at ``threads`` threads; each is called as the model is."""
    from sparsecc.runtimes.onnxruntime import engine as ort_runtime

    call = example if isinstance(example, Call) else Call(tuple(example))
    reference = sparsecc.masked_reference(model, masks) if masks else sparsecc.masked_reference(model)
    # onnxruntime runs the file in the model's own dtype (an fp16 model's ONNX file is fp16)
    own = _precision_name(float_dtype(reference))
    names_precisions = [("onnxruntime dense", own), ("onnxruntime condensed", own)] + (
        [("OpenVINO f32", "f32"), ("OpenVINO default", "default")] if openvino else [])
    try:
        path, names, outputs = dense_onnx(reference, call, directory)
    except SparseccError as exc:      # no ONNX file of this model (a decoder answering a KV cache): no peer
        why = f"no ONNX export of this model ({type(exc).__name__}: {exc})"[:300]
        return [Peer(name, precision, unavailable=why) for name, precision in names_precisions]
    arrangement = Arrangement.of(reference.forward, call) if call.kwargs else None
    found = [Peer("onnxruntime dense", own,
                  ort_runtime.load(path, names, outputs, threads=threads, arrangement=arrangement))]
    try:
        found.append(Peer("onnxruntime condensed", own, sparsecc.compile(
            model, call.args, example_kwargs=dict(call.kwargs) or None, masks=masks, backend="onnxruntime",
            runtime_options={"threads": threads})))
    except SparseccError as exc:
        found.append(Peer("onnxruntime condensed", own, unavailable=f"{type(exc).__name__}: {exc}"[:300]))
    if not openvino:
        return found
    reason = openvino_unavailable()
    for name, hint in (("OpenVINO f32", "f32"), ("OpenVINO default", None)):
        if reason is not None:
            found.append(Peer(name, "f32" if hint else "default", unavailable=reason))
            continue
        module = OpenVINOModule(path, outputs, threads, hint, names, arrangement)
        found.append(Peer(name, module.precision, module))
    return found


def tolerance(precision: str) -> Optional[float]:
    """The output tolerance (relative to max |reference|) a peer computing in ``precision`` is checked with:
    fp32 peers as tightly as sparsecc itself (None: the dtype's default), reduced-precision ones loosely (their
    error grows with depth; the table gives it)."""
    return None if precision == "fp32" else 0.1
