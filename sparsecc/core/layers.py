"""The modules a rewrite puts in place of a sparse layer. Each holds its condensed tensors as buffers, checks
its input (naming the layer), and calls one sparsecc op on the runtime chosen at compile time."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from sparsecc.core.errors import InputError, PassError
from sparsecc.core.inputs import Call
from sparsecc.core.registry import get_runtime


class _Semantics(threading.local):
    dense = False


_SEMANTICS = _Semantics()


@contextlib.contextmanager
def dense_semantics() -> Iterator[None]:
    """Condensed layers compute with their dense weights inside this block. A condensed kernel never reads
    the inputs a row's pruned weights would multiply, so a NaN/Inf there would not reach the outputs it
    reaches in the masked dense model (0 * NaN is NaN): `CompiledModel` runs calls with non-finite inputs
    in this mode, with bf16 GEMMs and convolutions exact about where NaN and Inf go (`exact_bf16`)."""
    before = _SEMANTICS.dense
    _SEMANTICS.dense = True
    try:
        with exact_bf16():
            yield
    finally:
        _SEMANTICS.dense = before


def in_dense_semantics() -> bool:
    """Whether this thread is inside `dense_semantics` (a fused graph, which cannot follow it, steps aside)."""
    return _SEMANTICS.dense


#: The ops `exact_bf16` computes in float32.
_GEMMS = frozenset({torch.nn.functional.linear, torch.conv1d, torch.conv2d, torch.conv3d})


class _ExactBf16(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _GEMMS or not args or not isinstance(args[0], Tensor):
            return func(*args, **kwargs)
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if args[0].dtype != torch.bfloat16 and not (autocast and args[0].dtype == torch.float32):
            return func(*args, **kwargs)
        wide = lambda t: t.float() if isinstance(t, Tensor) and t.dtype == torch.bfloat16 else t  # noqa: E731
        with torch.autocast("cpu", enabled=False):
            out = func(*map(wide, args), **{k: wide(v) for k, v in kwargs.items()})
        return out.to(torch.bfloat16)


@contextlib.contextmanager
def exact_bf16() -> Iterator[None]:
    """bf16 Linears and convolutions (and float32 ones under bf16 autocast) computed in float32, rounded to bf16
    once, as oneDNN's bf16 kernels accumulate. Those kernels (torch 2.14, AMX) read on past the end of an input
    row or window into its neighbour where the inner size is not a multiple of their block, multiplying what they
    read there by zero: a NaN or Inf in the neighbour then makes NaN where the math has none (a Linear 38 wide:
    the token before the one with the NaN). The same values where everything is finite; for the calls with
    non-finite inputs (`dense_semantics`), and the checks that compare where NaN goes."""
    with _ExactBf16():
        yield


class DenseView(Tensor):
    """The dense weight a condensed layer computes with, handed to code that reads ``layer.weight`` (torch's
    ``TransformerEncoder`` checks, a library's functional call). It behaves as a plain tensor, but being a
    subclass with ``__torch_function__`` makes torch's fused fast paths, which would run these dense weights
    instead of the condensed layer, take their regular path through the layer."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class CondensedLayer(nn.Module):
    """Common part: where the layer came from, which runtime runs it, and the dense op it stands for.

    Subclasses (one or more per pattern, `sparsecc.core.patterns`) name their op and layer kind (``"linear"``,
    ``"conv2d"``), say which input dimension must match (`_dims`, `_axis`, `in_size`), which tensors and
    arguments their op takes (`_constants`), and the dense weight they stand for (`_dense_weight`).
    ``gathers``: the layer holds fan-in ``values``/``indices`` over its input, which ONNX export can run as a
    Gather."""

    op: str
    kind: str
    gathers = False
    #: Cast a floating input of another dtype to the layer's (``precision="bf16"``: an fp32 model whose
    #: condensed layers hold bf16 values, as autocast casts a Linear's input); otherwise such an input is refused.
    input_cast = False
    _dims: int
    _axis: int

    def __init__(self, name: str, weight_fqn: str, bias_fqn: Optional[str], weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.name = name
        self.weight_fqn = weight_fqn
        self.bias_fqn = bias_fqn
        self.weight_shape = tuple(weight_shape)
        self.runtime = "reference"     # set by the planner to the runtime that runs this op
        self.in_size = self.weight_shape[1]
        # A per-output-channel affine absorbed from the op after this one (`fold_affine`); None when there is none.
        self.register_buffer("out_scale", None)
        self.register_buffer("out_shift", None)

    def _constants(self) -> tuple:
        raise NotImplementedError

    def _reject(self, x: Tensor, dtype: torch.dtype) -> None:
        if x.dtype != dtype:
            raise InputError(f"{self.name}: input dtype {x.dtype} but the layer was compiled for {dtype}; cast "
                             f"the model input to {dtype} or compile with inputs of that dtype")
        raise InputError(f"{self.name}: input shape {tuple(x.shape)} does not fit weight {self.weight_shape} "
                         f"(expects size {self.in_size} at dim {self._axis}, at least {self._dims}-D)")

    def _dense_op(self) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
        raise NotImplementedError

    def dense_op(self) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
        """The dense op this layer stands for, as ``op(x, weight, bias)`` on the original weights, followed by the
        affine it absorbed if any (holds no reference to the layer)."""
        op = self._dense_op()
        if self.out_scale is None:
            return op
        view = (-1, *[1] * (-self._axis - 1))      # the output channel sits where the input's does
        scale, shift = self.out_scale.view(view), self.out_shift.view(view)
        return lambda x, weight, bias: op(x, weight, bias) * scale + shift

    def fold_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Absorb ``y * scale + shift`` per output channel (an eval-mode BatchNorm after this layer), once: each
        live row's values are scaled, the bias of every row becomes ``bias * scale + shift`` (ablated rows output
        their bias, so they stay exact). Equal to the two ops up to rounding."""
        if self.out_scale is not None:
            raise PassError(f"{self.name}: an affine is already folded into this layer")
        values, bias, rows = self._buffers["values"], self._buffers["bias"], self._buffers.get("rows")
        scale, shift = scale.to(values.dtype), shift.to(values.dtype)
        self.values = values * (scale if rows is None else scale[rows])[:, None]   # value row i is output rows[i]
        self.bias = (bias if bias is not None else torch.zeros_like(scale)) * scale + shift
        self.out_scale, self.out_shift = scale.clone(), shift.clone()

    def __getstate__(self):
        """Copies and pickles leave the bound kernel and the dense view behind: both are rebuilt on use."""
        state = self.__dict__.copy()
        state.pop("_bound", None)
        state.pop("_dense", None)
        return state

    def _dense_weight(self) -> Tensor:
        raise NotImplementedError

    def live_weight(self) -> tuple[Tensor, Optional[Tensor]]:
        """The dense weight of the live rows, ``[R, *weight_shape[1:]]``, and which output rows they are (None:
        all): what exporters build dense or row-dropped formulations from."""
        rows = self._buffers.get("rows")
        dense = self._dense_weight().reshape(self.weight_shape)
        return (dense if rows is None else dense[rows]), rows

    @property
    def weight(self) -> DenseView:
        """The dense weight this layer computes with (the original masked weight, times a folded affine), for
        code that inspects it; the layer itself never uses it."""
        cached = self.__dict__.get("_dense")
        values = self._buffers["values"]
        if cached is None or cached[0] is not values:
            dense = self._dense_weight().reshape(self.weight_shape)
            cached = self.__dict__["_dense"] = (values, torch.Tensor._make_subclass(DenseView, dense))
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        """Eager calls go to the runtime's kernel bound to this layer's tensors (the custom op's Python
        dispatch costs tens of microseconds, as much as a batch-1 kernel); tracing and compiling see the op.
        This runs on every call: buffers are read from ``_buffers`` directly, checks are inline."""
        values = self._buffers["values"]
        if x.dtype != values.dtype and self.input_cast and x.is_floating_point():
            x = x.to(values.dtype)
        if x.dtype != values.dtype or x.dim() < self._dims or x.shape[self._axis] != self.in_size:
            self._reject(x, values.dtype)
        if _SEMANTICS.dense or not x.numel():      # NaN/Inf semantics of the dense op; empty batches
            return self._dense_op()(x, self.weight.as_subclass(Tensor), self._buffers["bias"])
        # Traced inputs (fake or functional tensors: dynamo, or inductor compiling a graph outside dynamo for a
        # module state first seen at call time) and inputs wanting a gradient go through the op.
        if torch.compiler.is_compiling() or type(x) is not Tensor or (x.requires_grad and torch.is_grad_enabled()):
            # the registered op (its pattern defines it) carries the backward
            return getattr(torch.ops.sparsecc, self.op)(x, *self._constants(), self.runtime)
        bound = self.__dict__.get("_bound")
        if bound is not None and bound[0] is values and bound[1] is self.runtime:   # `_bound_kernel`, inline:
            return bound[2](x)                                                       # a method call per call
        return self._bound_kernel(values)(x)

    def _bound_kernel(self, values: Tensor) -> Callable[[Tensor], Tensor]:
        bound = self.__dict__.get("_bound")
        if bound is None or bound[0] is not values or bound[1] != self.runtime:
            # Rebound when buffers are replaced (.to(), load_state_dict) or the runtime changes.
            bound = self.__dict__["_bound"] = (values, self.runtime,
                                               get_runtime(self.runtime).bind(self.op, *self._constants()))
        return bound[2]

    def chain_bound(self, x: Tensor, width: Optional[int] = None) -> Optional[Callable[[Tensor], Tensor]]:
        """The runtime's bound kernel when a call on ``x`` would run it eagerly as it is; None where `forward`
        would cast, refuse, trace or run densely. ``width``: the size of the call's input along the layer's
        axis when ``x`` stands for it but is not it (`sparsecc.core.chain`: the layer after fc1 is asked with
        fc1's input and fc1's output width)."""
        values = self._buffers["values"]
        width = x.shape[self._axis] if width is None and x.dim() >= self._dims else width
        if x.dtype != values.dtype or x.dim() < self._dims or width != self.in_size or _SEMANTICS.dense \
                or not x.numel() \
                or torch.compiler.is_compiling() or type(x) is not Tensor \
                or (x.requires_grad and torch.is_grad_enabled()) or self.out_scale is not None:
            return None
        return self._bound_kernel(values)

    def choices(self) -> dict:
        """The runtime's sparse-or-dense choices for this layer so far, by (token bucket, threads)."""
        bound = self.__dict__.get("_bound")
        return dict(getattr(bound[2], "choices", {})) if bound is not None else {}

    def extra_repr(self) -> str:
        return f"{self.name}, weight={self.weight_shape}, runtime={self.runtime}"


def record_first_calls(module: nn.Module, inputs: Any, watch: Iterable[tuple[str, nn.Module]],
                       keep: Callable[[nn.Module, tuple, Any], Any]) -> dict[str, Any]:
    """One no-grad run of ``module`` on ``inputs``: for each watched (name, submodule), what ``keep`` makes of
    its first call (module, args, output); submodules the run does not reach are absent. ``inputs`` is a
    `sparsecc.core.inputs.Call` or a tuple of positional inputs."""

    seen: dict[str, Any] = {}

    def record(name: str, m: nn.Module, args: tuple, out: Any) -> None:   # None: output unchanged
        if name not in seen:
            seen[name] = keep(m, args, out)

    hooks = [m.register_forward_hook(functools.partial(record, name)) for name, m in watch]
    try:
        with torch.no_grad():
            Call.of(inputs)(module)
    finally:
        for h in hooks:
            h.remove()
    return seen


def first_calls(module: nn.Module, inputs: tuple) -> dict[str, tuple["CondensedLayer", Tensor, Tensor]]:
    """Each condensed layer of ``module`` (by path) with its input and output on its first call."""
    watch = [(path, m) for path, m in module.named_modules() if isinstance(m, CondensedLayer)]
    return record_first_calls(module, inputs, watch, lambda m, args, out: (m, args[0], out))
