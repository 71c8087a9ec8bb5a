"""What each condensed layer becomes in an exported graph: plain torch modules built only from ops every ONNX
runtime has (Gather, Mul, ReduceSum, MatMul/Gemm, Conv, Pad), swapped in before `torch.onnx.export`.

Formulations, per layer, one table (`FORMS`):

- ``gather`` — ``ReduceSum(Mul(Gather(x, indices), values))`` over the live rows: stores ``k`` values and
  indices per row. onnxruntime runs Gather at ~13 ns per element, so it beats a dense MatMul only when a row
  keeps under ~1/60 of its inputs and there is one position (token) per sample (1 thread: 3072 -> 768 at one
  token 1.51x dense at 99%, 0.22x at 90%; 768 -> 3072 at 197 tokens 0.03-0.25x; `GATHER_MAX_DENSITY`).
- ``rows`` — a dense MatMul / Conv over the live rows only (ablated neurons dropped). Ablated rows are put
  back by padding the live outputs with one zero channel and gathering every output channel from it (ablated
  ones pick the zero), then adding the full bias: ``act(bias)`` stays exact. That Gather is cheap along a
  convolution's channels (whole planes) but runs element by element along a Linear's last axis, so it pays
  only from `ROWS_MIN_ABLATED` of the rows ablated (measured, docs/exporting.md). Grouped convolutions keep
  all their filters.
- ``dense`` — the masked dense weight with explicit zeros: what onnxruntime runs fastest when neither of the
  above pays (it has no sparse CPU kernel), and what TensorRT's sparse-weight builder reads (``mode="dense"``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecc.core.layers import CondensedLayer

#: Largest k / in_features for which ``gather`` is picked (one position per sample); measured, see above.
GATHER_MAX_DENSITY = 1 / 60
#: Smallest fraction of ablated rows for which ``rows`` beats ``dense`` in onnxruntime: Linear layers with
#: several positions per sample (768->3072, 197 tokens: 0.71x at 5%, 0.85x at 30%, 1.14x at 60%), and the
#: others (1 token: 1.00x / 1.24x / 1.76x; convs 0.79-1.01x / 1.01-1.33x / 1.39-2.08x); docs/exporting.md.
ROWS_MIN_ABLATED = {"tokens": 0.5, "other": 0.25}


def _placement(rows: Optional[Tensor], out: int) -> Optional[Tensor]:
    """For each output channel, its live row, or ``len(rows)`` (the zero pad) when it is ablated."""
    if rows is None:
        return None
    place = torch.full((out,), rows.numel(), dtype=torch.int64)
    place[rows] = torch.arange(rows.numel())
    return place


class _Placed(nn.Module):
    """Live rows computed by a subclass, ablated rows put back, bias added."""

    channel_dim = -1     # counted from the end, so unbatched inputs work too

    def __init__(self, rows: Optional[Tensor], out: int, bias: Optional[Tensor]) -> None:
        super().__init__()
        self.register_buffer("place", _placement(rows, out))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def live(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.live(x)
        trailing = -self.channel_dim - 1
        if self.place is not None:
            y = torch.index_select(F.pad(y, [0, 0] * trailing + [0, 1]), self.channel_dim, self.place)
        if self.bias is not None:
            y = y + self.bias.view(-1, *[1] * trailing)
        return y


class GatherLinear(_Placed):
    """``sum_j values[r, j] * x[..., indices[r, j]]`` for each live row r."""

    def __init__(self, values: Tensor, indices: Tensor, rows: Optional[Tensor], out: int,
                 bias: Optional[Tensor]) -> None:
        super().__init__(rows, out, bias)
        self.register_buffer("values", values.detach().clone())
        self.register_buffer("indices", indices.to(torch.int32).flatten().contiguous())   # Gather takes int32

    def live(self, x: Tensor) -> Tensor:
        r, k = self.values.shape
        gathered = torch.index_select(x, -1, self.indices).unflatten(-1, (r, k))
        return (gathered * self.values).sum(-1)


class RowsLinear(_Placed):
    def __init__(self, weight: Tensor, rows: Optional[Tensor], out: int, bias: Optional[Tensor]) -> None:
        super().__init__(rows, out, bias)
        self.register_buffer("weight", weight.detach().clone())

    def live(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class RowsConv2d(_Placed):
    channel_dim = -3

    def __init__(self, weight: Tensor, rows: Optional[Tensor], out: int, bias: Optional[Tensor],
                 layer: CondensedLayer) -> None:
        super().__init__(rows, out, bias)
        self.register_buffer("weight", weight.detach().clone())
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, \
            layer.groups

    def live(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)


class DenseLinear(nn.Module):
    def __init__(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class DenseConv2d(DenseLinear):
    def __init__(self, weight: Tensor, bias: Optional[Tensor], layer: CondensedLayer) -> None:
        super().__init__(weight, bias)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, \
            layer.groups

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def dense_weight(layer: CondensedLayer) -> Tensor:
    """The masked dense weight a condensed layer stands for."""
    live, rows = layer.live_weight()
    if rows is None:
        return live
    return live.new_zeros(layer.weight_shape).index_copy_(0, rows, live)


def gather_fits(layer: CondensedLayer, positions_per_sample: Optional[int]) -> bool:
    """Whether ``gather`` is the faster formulation for ``layer`` in onnxruntime (see module docstring)."""
    return (layer.gathers and positions_per_sample == 1 and layer.values.shape[0] > 0
            and layer.values.shape[1] <= GATHER_MAX_DENSITY * layer.weight_shape[1])


def pick(layer: CondensedLayer, positions_per_sample: Optional[int]) -> str:
    """The formulation onnxruntime runs fastest for ``layer`` (``formulation="auto"``)."""
    if gather_fits(layer, positions_per_sample):
        return "gather"
    ablated = 1 - layer.values.shape[0] / layer.weight_shape[0]
    tokens = layer.kind != "conv2d" and (positions_per_sample or 1) > 1
    return "rows" if ablated >= ROWS_MIN_ABLATED["tokens" if tokens else "other"] else "dense"


def _gather(layer: CondensedLayer) -> nn.Module:
    if not layer.gathers or layer.values.shape[0] == 0:
        return _rows(layer)     # gather needs live fan-in rows; the others run best as rows anyway
    return GatherLinear(layer.values, layer.indices, layer.rows, layer.weight_shape[0], layer.bias)


def _rows(layer: CondensedLayer) -> nn.Module:
    if layer.kind == "conv2d" and layer.groups > 1:
        return _dense(layer)    # dropping filters would move the group boundaries
    live, rows = layer.live_weight()
    if live.shape[0] == 0:    # every neuron ablated: one zero row keeps the graph's shapes non-empty
        live = live.new_zeros(1, *live.shape[1:])
    if layer.kind == "conv2d":
        return RowsConv2d(live, rows, layer.weight_shape[0], layer.bias, layer)
    return RowsLinear(live, rows, layer.weight_shape[0], layer.bias)


def _dense(layer: CondensedLayer) -> nn.Module:
    if layer.kind == "conv2d":
        return DenseConv2d(dense_weight(layer), layer.bias, layer)
    return DenseLinear(dense_weight(layer), layer.bias)


#: Formulation name -> builder of the exported module for one condensed layer.
FORMS: dict[str, Callable[[CondensedLayer], nn.Module]] = {
    "gather": _gather,     # Gather -> Mul -> ReduceSum over live rows (fan-in Linear only)
    "rows": _rows,         # MatMul / Conv over live rows, ablated rows padded back
    "dense": _dense,       # masked dense weight with explicit zeros
}
