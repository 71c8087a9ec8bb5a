"""TVM runtime: condensed ops as TensorIR kernels compiled by LLVM for this CPU (`tvm_kernels`), cached on
disk (`kernel_cache`), called on torch tensors without copies where the layout allows.

Per call it picks the kernel by token count: one token at a time below `SPMM_MIN_TOKENS` (gather-bound
GEMV), the transposed token kernel above (vectorised over tokens). Inputs are guarded: float32 only, any
strides or alignment (copied to a contiguous tensor when needed; kernels assume element alignment only).
Kernels run on the calling thread; concurrent callers share compiled kernels read-only.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc import ops
from sparsecc.errors import InputError

NAME = "tvm"
DTYPES = (torch.float32,)
#: From this many tokens on, the token-vectorised kernel beats one GEMV per token (measured: see
#: docs/benchmarks.md).
SPMM_MIN_TOKENS = 8

_state_lock = threading.Lock()
_cache = None


def unavailable() -> Optional[str]:
    try:
        import tvm  # noqa: F401
        from tvm.script import tirx  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the runtime is missing
        return f"apache-tvm is not importable ({type(exc).__name__}: {exc}); pip install apache-tvm==0.27.0.post1"
    return None


def kernel_cache():
    """The process-wide kernel cache for the host CPU target."""
    global _cache
    with _state_lock:
        if _cache is None:
            import tvm

            from sparsecc.runtimes import kernel_cache as kc
            from sparsecc.runtimes import tvm_kernels

            target = tvm.target.Target.from_device("cpu")
            _cache = kc.KernelCache(target, (Path(tvm_kernels.__file__),))
        return _cache


def _kernel(kind: str, k: int, tokens: int, index_dtype: torch.dtype, bias: bool) -> Callable:
    import tvm

    from sparsecc.runtimes import tvm_kernels

    key = tvm_kernels.KernelKey(kind, k, tokens, str(index_dtype).removeprefix("torch."), "float32", bias)
    return kernel_cache().get(key.name(), lambda: tvm.IRModule({key.name(): tvm_kernels.build(key)}))


@dataclass
class _Layer:
    """Per-layer constants the kernels need, derived once from the op's tensors."""

    orow: Tensor        # int32 output row of each live row
    arow: Tensor        # int32 ablated output rows
    bias: Tensor        # the bias, or zeros (the kernel built without bias does not read it)
    has_bias: bool
    indices: Tensor     # the op's indices, or group-offset int32 indices for grouped convolutions
    refs: tuple         # weak references to the op's tensors: the entry is valid while they are the same
    k: int
    kernels: dict = field(default_factory=dict)   # (kind, tokens) -> compiled kernel

    def kernel(self, kind: str, tokens: int) -> Callable:
        fn = self.kernels.get((kind, tokens))
        if fn is None:
            fn = self.kernels[(kind, tokens)] = _kernel(kind, self.k, tokens, self.indices.dtype, self.has_bias)
        return fn


_layers: dict[tuple[int, ...], _Layer] = {}


def _layer(values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor], out: int,
           groups: int = 1, group_fan_in: int = 0) -> _Layer:
    tensors = (values, indices, rows, bias)
    key = tuple(map(id, tensors))
    entry = _layers.get(key)
    if entry is not None and all((r() if r is not None else None) is t for r, t in zip(entry.refs, tensors)):
        return entry
    live = torch.ones(out, dtype=torch.bool)
    if rows is not None:
        live[:] = False
        live[rows] = True
    orow = torch.nonzero(live).flatten()
    arow = torch.nonzero(~live).flatten().to(torch.int32)
    idx = indices
    if groups > 1:   # one kernel over the whole unfolded input: shift each filter's indices into its group
        shift = (orow // (out // groups)) * group_fan_in
        idx = (indices.to(torch.int64) + shift[:, None]).to(torch.int32).contiguous()
    entry = _Layer(orow.to(torch.int32), arow, bias.contiguous() if bias is not None else values.new_zeros(out),
                   bias is not None, idx, tuple(weakref.ref(t) if t is not None else None for t in tensors),
                   values.shape[1])
    with _state_lock:
        _layers[key] = entry
    weakref.finalize(values, _layers.pop, key, None)
    return entry


def _float_contiguous(x: Tensor, what: str) -> Tensor:
    if x.dtype != torch.float32:
        raise InputError(f"tvm runtime: {what} is {x.dtype}; its kernels take float32 (compile with "
                         f"backend='reference' for other dtypes)")
    if x.device.type != "cpu":
        raise InputError(f"tvm runtime: {what} is on {x.device}; its kernels run on the CPU")
    # Kernels assume element alignment only, but a view whose storage offset is not a whole element cannot
    # exist for float32; contiguity is what they need.
    return x if x.is_contiguous() else x.contiguous()


def _spmm(xt: Tensor, values: Tensor, layer: _Layer, out: int) -> Tensor:
    """``[out, tokens]`` from ``xt = [in, tokens]``."""
    tokens = xt.shape[1]
    y = xt.new_empty(out, tokens)
    layer.kernel("spmm", tokens)(xt, values, layer.indices, layer.orow, layer.arow, layer.bias, y)
    return y


def _constant(x: Tensor, bias: Optional[Tensor], shape: tuple[int, ...], channel_dim: int) -> Tensor:
    """The output of a layer whose every row is ablated: its bias (or zeros) broadcast."""
    if bias is None:
        return x.new_zeros(shape)
    view = [1] * len(shape)
    view[channel_dim] = -1
    return bias.view(view).expand(shape).contiguous()


def condensed_linear(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                     out_features: int) -> Tensor:
    x = _float_contiguous(x, "input")
    if values.shape[0] == 0:
        return _constant(x, bias, (*x.shape[:-1], out_features), -1)
    layer = _layer(values, indices, rows, bias, out_features)
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0]
    if tokens >= SPMM_MIN_TOKENS:
        y = _spmm(x2.t().contiguous(), values, layer, out_features).t().contiguous()
    else:
        y = x2.new_empty(tokens, out_features)
        fn = layer.kernel("gemv", 1)
        for t in range(tokens):
            fn(x2[t], values, layer.indices, layer.orow, layer.arow, layer.bias, y[t])
    return y.reshape(*x.shape[:-1], out_features)


def condensed_conv2d(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                     out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int) -> Tensor:
    x = _float_contiguous(x, "input")
    unbatched = x.dim() == 3
    xb = x.unsqueeze(0) if unbatched else x
    n, c, h, w = xb.shape
    if values.shape[0] == 0:
        oh, ow = (ops.conv_out_size(s, k, st, p, d) for s, k, st, p, d in
                  zip((h, w), kernel_size, stride, padding, dilation))
        y = _constant(x, bias, (n, out_channels, oh, ow), 1)
        return y[0] if unbatched else y
    layer = _layer(values, indices, rows, bias, out_channels, groups,
                   (c // groups) * kernel_size[0] * kernel_size[1])
    pointwise = kernel_size == [1, 1] and padding == [0, 0] and dilation == [1, 1]
    outs = []
    for i in range(n):
        if pointwise:
            sample = xb[i, :, ::stride[0], ::stride[1]] if stride != [1, 1] else xb[i]
            oh, ow = sample.shape[-2:]
            cols = sample.reshape(c, oh * ow).contiguous()
        else:
            cols = F.unfold(xb[i:i + 1], kernel_size, dilation, padding, stride)[0]
            oh, ow = (ops.conv_out_size(s, k, st, p, d) for s, k, st, p, d in
                      zip((h, w), kernel_size, stride, padding, dilation))
        outs.append(_spmm(cols, values, layer, out_channels).view(out_channels, oh, ow))
    y = torch.stack(outs) if n > 1 else outs[0].unsqueeze(0)
    return y[0] if unbatched else y


KERNELS = {
    "condensed_linear": condensed_linear,
    "condensed_conv2d": condensed_conv2d,
}

