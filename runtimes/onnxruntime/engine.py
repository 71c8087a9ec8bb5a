"""onnxruntime engine: a whole model exported by `sparsecc.export_onnx` (condensed mode) run in an
InferenceSession on the CPU. Unlike the op runtimes it runs the entire graph; `compile(backend="onnxruntime")`
exports, loads and validates it like any backend.

Sessions run on as many intra-op threads as torch (``torch.get_num_threads()`` at each call: one session per
count, made on first use) unless ``threads`` fixes the count, with full graph optimisation.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from sparsecc.core.errors import InputError
from sparsecc.core.inputs import Arrangement
from sparsecc.runtimes import file_inputs, refuse_grad

NAME = "onnxruntime"
#: What this engine is fed: `export_onnx` arguments. Batch and length axes are free, as for the model (checked at
#: other sizes when the file is written; where they are not, only the batch is and a call at another size is an
#: `InputError`).
EXPORT = {"mode": "condensed", "precision": "fp32", "dynamic_axes": "auto"}
OPTIONS = ("threads", "onnx_path")
KEEPS_FILE = False      # the session keeps the bytes


def unavailable() -> Optional[str]:
    try:
        import onnxruntime  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the engine is missing
        return f"onnxruntime is not importable ({type(exc).__name__}: {exc}); pip install onnxruntime"
    return None


def session(model: "str | Path | bytes", threads: int = 1):
    """An InferenceSession on the CPU for a file or its bytes, with ``threads`` intra-op threads that do not
    spin between runs: in a process that also runs torch, spinning workers take the cores of torch's next ops
    (ResNet-18 at 2 threads on a Xeon: dense torch 20-22 ms right after a spinning session's run, 8.2 ms after a
    session that does not spin)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


class SessionModule(nn.Module):
    """Calls an ONNX session with torch tensors and returns torch tensors nested like the original outputs.
    The session is made from the file's bytes once and is safe to call from several threads."""

    def __init__(self, model_bytes: bytes, input_names: list[str], outputs: pytree.TreeSpec,
                 threads: Optional[int], arrangement: Optional[Arrangement] = None) -> None:
        super().__init__()
        self.model_bytes, self.input_names, self.outputs, self.threads = model_bytes, input_names, outputs, threads
        self.arrangement = arrangement     # how the model's calls map to the file's inputs (None: positional)
        self._lock = threading.Lock()
        self._sessions: dict[int, Any] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_sessions"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _get(self):
        threads = self.threads or torch.get_num_threads()
        found = self._sessions.get(threads)
        if found is None:
            with self._lock:
                found = self._sessions.get(threads)
                if found is None:
                    found = self._sessions[threads] = session(self.model_bytes, threads)
        return found

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = file_inputs(self.arrangement, args, kwargs, self.input_names, NAME)
        refuse_grad(NAME, inputs)
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, inputs)}
        try:
            outs = self._get().run(None, feeds)
        except Exception as exc:
            if type(exc).__name__ != "InvalidArgument":      # onnxruntime's own check of the feeds' shapes
                raise
            taken = ", ".join(f"{i.name} {_dims(i.shape)}" for i in self._get().get_inputs())
            given = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(self.input_names, inputs))
            raise InputError(f"the onnxruntime engine takes {taken} (names are free axes, numbers fixed sizes); "
                             f"got {given}: call it at the compiled sizes, or compile again with example inputs "
                             f"of the new size") from exc
        return pytree.tree_unflatten([torch.from_numpy(o) for o in outs], self.outputs)


def _dims(shape: list) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + ")"


def load(onnx_path: Path, input_names: list[str], outputs: pytree.TreeSpec, threads: Optional[int] = None,
         arrangement: Optional[Arrangement] = None, **_: Any) -> nn.Module:
    """The exported file as a module (its bytes are kept: the file may be temporary), called as the model is
    (``arrangement``: keyword inputs by name). ``threads=None`` follows torch's thread count."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"onnxruntime threads={threads!r}: give a positive integer (or None: torch's count)")
    module = SessionModule(Path(onnx_path).read_bytes(), input_names, outputs, threads, arrangement)
    module._get()
    return module
