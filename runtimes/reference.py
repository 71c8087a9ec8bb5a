"""Pure-torch kernels for every sparsecc op: the semantics every other runtime is checked against.

Few tokens: gather the inputs each row reads and reduce (``sum(values * x[..., indices])``, the SRigL
method). Many tokens: scatter the values into a dense weight and use torch's GEMM, which beats a gather once
the weight is reused across enough tokens. Convolutions always take the scatter path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc import formats

NAME = "reference"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Up to this many tokens the gather path is used; above it, scatter-to-dense + GEMM.
GATHER_MAX_TOKENS = 8


def unavailable() -> Optional[str]:
    return None


def _scatter_rows(y_kept: Tensor, rows: Optional[Tensor], bias: Optional[Tensor], out_features: int) -> Tensor:
    if rows is None:
        return y_kept if bias is None else y_kept + bias
    if bias is None:
        y = y_kept.new_zeros(*y_kept.shape[:-1], out_features)
    else:
        y = bias.expand(*y_kept.shape[:-1], out_features).clone()
    y[..., rows] += y_kept
    return y


def condensed_linear(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                     out_features: int) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= GATHER_MAX_TOKENS:
        y = (x2[:, indices.long()] * values).sum(dim=-1)
    else:
        dense = values.new_zeros(values.shape[0], x.shape[-1]).scatter_(1, indices.long(), values)
        y = x2 @ dense.t()
    return _scatter_rows(y, rows, bias, out_features).reshape(*x.shape[:-1], out_features)


def condensed_conv2d(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                     out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int) -> Tensor:
    fan_in = (x.shape[-3] // groups) * kernel_size[0] * kernel_size[1]
    weight = formats.decode_fanin(values, indices, rows, out_channels, fan_in)
    weight = weight.reshape(out_channels, x.shape[-3] // groups, *kernel_size)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def nm_linear(x: Tensor, values: Tensor, metadata: Tensor, bias: Optional[Tensor], in_features: int) -> Tensor:
    indices = formats.nm_indices(metadata, in_features)
    return condensed_linear(x, values, indices, None, bias, values.shape[0])


KERNELS = {
    "condensed_linear": condensed_linear,
    "condensed_conv2d": condensed_conv2d,
    "nm_linear": nm_linear,
}
