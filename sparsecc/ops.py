"""The sparsecc operator contract: torch.library custom ops with fake kernels, so torch.export,
torch.compile and ONNX export can trace them.

Each op takes the name of the runtime that executes it as its last argument; the real kernel is looked up in
that runtime's kernel table at call time, so one graph can mix runtimes and an exported graph keeps its choice.

- ``condensed_linear(x, values[R,k], indices[R,k], rows[R]?, bias[out]?, out_features, runtime)``:
  ``y[..., rows[r]] = sum_j values[r,j] * x[..., indices[r,j]] + bias[rows[r]]``; rows absent from ``rows``
  (ablated neurons) output ``bias`` (or 0). ``rows`` is None when no row is ablated.
- ``condensed_conv2d``: the same over each filter's flattened ``C/groups*R*S`` fan-in, with stride, padding,
  dilation and groups.
- ``nm_linear(x, values[out, in/2], metadata[out, ceil(in/8)] uint8, bias?, in_features, runtime)``: 2:4
  along K; each group of 4 inputs keeps 2 weights whose positions (2 bits each) fill one nibble of metadata.

Outputs are never views or aliases of an input: autograd forbids in-place ops on a view a custom op returns
(``ReLU(inplace=True)`` after a loaded ``.pt2``), and an alias of the bias would let callers write into it.
Each op has a backward for its input ``x`` (through the dense weight it stands for), so a call with an input
that requires grad works; the condensed constants get no gradient (training through them is not a goal).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsecc import formats


def _kernel(runtime: str, op: str):
    from sparsecc.runtimes import get_runtime

    return get_runtime(runtime).kernel(op)


def _own(out: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """``out`` as a tensor of its own: a view of a kernel's internal buffer is detached (same memory, no
    longer a view), an alias of an input is copied."""
    if out._is_view():
        out = out.detach()
    ptr = out.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs):
        out = out.clone()
    return out


@torch.library.custom_op("sparsecc::condensed_linear", mutates_args=())
def condensed_linear(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                     out_features: int, runtime: str) -> Tensor:
    return _own(_kernel(runtime, "condensed_linear")(x, values, indices, rows, bias, out_features), x, bias)


@condensed_linear.register_fake
def _(x, values, indices, rows, bias, out_features, runtime):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("sparsecc::condensed_conv2d", mutates_args=())
def condensed_conv2d(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                     out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, runtime: str) -> Tensor:
    out = _kernel(runtime, "condensed_conv2d")(x, values, indices, rows, bias, out_channels, kernel_size, stride,
                                               padding, dilation, groups)
    return _own(out, x, bias)


@condensed_conv2d.register_fake
def _(x, values, indices, rows, bias, out_channels, kernel_size, stride, padding, dilation, groups, runtime):
    h, w = (conv_out_size(x.shape[-2 + i], kernel_size[i], stride[i], padding[i], dilation[i]) for i in range(2))
    return x.new_empty((*x.shape[:-3], out_channels, h, w))


@torch.library.custom_op("sparsecc::nm_linear", mutates_args=())
def nm_linear(x: Tensor, values: Tensor, metadata: Tensor, bias: Optional[Tensor], in_features: int,
              runtime: str) -> Tensor:
    return _own(_kernel(runtime, "nm_linear")(x, values, metadata, bias, in_features), x, bias)


@nm_linear.register_fake
def _(x, values, metadata, bias, in_features, runtime):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.constants = inputs[1:]
    ctx.x_shape = inputs[0].shape


def _linear_grad(ctx, grad: Tensor):
    values, indices, rows, _, out_features, _ = ctx.constants
    weight = formats.decode_fanin(values, indices, rows, out_features, ctx.x_shape[-1])
    return (grad @ weight.to(grad.dtype), *[None] * 6)


def _conv_grad(ctx, grad: Tensor):
    values, indices, rows, _, out_channels, kernel_size, stride, padding, dilation, groups, _ = ctx.constants
    c = ctx.x_shape[-3] // groups
    weight = formats.decode_fanin(values, indices, rows, out_channels, c * kernel_size[0] * kernel_size[1])
    grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight.reshape(out_channels, c, *kernel_size).to(grad.dtype),
                                        grad, stride, padding, dilation, groups)
    return (grad_x, *[None] * 11)


def _nm_grad(ctx, grad: Tensor):
    values, metadata, _, in_features, _ = ctx.constants
    indices = formats.nm_indices(metadata, in_features)
    weight = formats.decode_fanin(values, indices, None, values.shape[0], in_features)
    return (grad @ weight.to(grad.dtype), *[None] * 5)


condensed_linear.register_autograd(_linear_grad, setup_context=_save)
condensed_conv2d.register_autograd(_conv_grad, setup_context=_save)
nm_linear.register_autograd(_nm_grad, setup_context=_save)


def conv_out_size(size, kernel: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


OPS = ("condensed_linear", "condensed_conv2d", "nm_linear")
