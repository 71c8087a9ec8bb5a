"""Constant fan-in (SRigL, Wanda's per-output pruning, SWAT's channel top-K): every kept output row has exactly
``k`` non-zeros; all-zero rows are ablated neurons.

Ops:

- ``condensed_linear(x, values[R,k], indices[R,k], rows[R]?, bias[out]?, out_features, runtime)``:
  ``y[..., rows[r]] = sum_j values[r,j] * x[..., indices[r,j]] + bias[rows[r]]``; rows absent from ``rows``
  (ablated neurons) output ``bias`` (or 0). ``rows`` is None when no row is ablated.
- ``condensed_conv2d``: the same over each filter's flattened ``C/groups*R*S`` fan-in, with stride, padding,
  dilation and groups.

Reference kernels: few tokens gather the inputs each row reads and reduce (the SRigL method); many tokens
scatter the values into a dense weight and use torch's GEMM, which beats a gather once the weight is reused
across enough tokens. Convolutions always take the scatter path.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecc.core import formats, reductions
from sparsecc.core.layers import CondensedLayer
from sparsecc.core.ops import conv_out_size, kernel, own, save_constants
from sparsecc.core.patterns.base import NotCondensable, Op, Pattern, Source
from sparsecc.core.structures import ConstantFanIn, Structure

#: Up to this many tokens the reference gathers; above it, scatter-to-dense + GEMM.
GATHER_MAX_TOKENS = 8


# -- detection -------------------------------------------------------------------------------------------------

def _rows(mask: Tensor) -> Tensor:
    return mask.reshape(mask.shape[0], -1)


def ablated(mask: Tensor) -> tuple[int, ...]:
    """The all-zero rows (filters) of ``mask``."""
    return tuple(torch.nonzero(~reductions.live_rows(mask)).flatten().tolist())


def detect(fqn: str, mask: Tensor) -> Optional[Structure]:
    counts = reductions.row_counts(mask)
    live = counts[counts > 0]
    if live.numel() and bool((live == live[0]).all()):
        return ConstantFanIn(int(live[0]), ablated(mask))
    if live.numel() == 0:
        return ConstantFanIn(0, ablated(mask))
    return None


def explain(mask: Tensor) -> str:
    counts = _rows(mask).sum(dim=1)
    live_rows = torch.nonzero(counts > 0).flatten()
    live = counts[live_rows]
    values, freq = torch.unique(live, return_counts=True)
    common = int(values[freq.argmax()])
    odd = live_rows[live != common]
    first = int(odd[0])
    if odd.numel() == 1:
        return f"row {first} has fan-in {int(counts[first])}, the others {common}"
    return (f"fan-in varies from {int(live.min())} to {int(live.max())}: {odd.numel()} of {live.numel()} "
            f"rows differ from the most common {common} (row {first} has {int(counts[first])})")


# -- ops -------------------------------------------------------------------------------------------------------

@torch.library.custom_op("sparsecc::condensed_linear", mutates_args=())
def linear_op(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
              out_features: int, runtime: str) -> Tensor:
    # contiguous, as the fake says (inductor checks a custom op's output strides against it)
    return own(kernel(runtime, LINEAR.name)(x, values, indices, rows, bias, out_features).contiguous(), x, bias)


@linear_op.register_fake
def _(x, values, indices, rows, bias, out_features, runtime):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("sparsecc::condensed_conv2d", mutates_args=())
def conv2d_op(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
              out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
              dilation: list[int], groups: int, runtime: str) -> Tensor:
    out = kernel(runtime, CONV2D.name)(x, values, indices, rows, bias, out_channels, kernel_size, stride, padding,
                                       dilation, groups)
    return own(out.contiguous(memory_format=_memory_format(x)), x, bias)


def _memory_format(x: Tensor) -> torch.memory_format:
    """The op answers in its input's memory format, as torch's convolution does and as its fake says (inductor
    checks a custom op's output strides against the fake's): channels-last for a 4-D channels-last input (not
    also contiguous), torch's layout otherwise. Runtimes that compute in another layout are converted here."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


@conv2d_op.register_fake
def _(x, values, indices, rows, bias, out_channels, kernel_size, stride, padding, dilation, groups, runtime):
    h, w = (conv_out_size(x.shape[-2 + i], kernel_size[i], stride[i], padding[i], dilation[i]) for i in range(2))
    return x.new_empty((*x.shape[:-3], out_channels, h, w)).contiguous(memory_format=_memory_format(x))


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


linear_op.register_autograd(_linear_grad, setup_context=save_constants)
conv2d_op.register_autograd(_conv_grad, setup_context=save_constants)


def _scatter_rows(y_kept: Tensor, rows: Optional[Tensor], bias: Optional[Tensor], out_features: int) -> Tensor:
    if rows is None:
        return y_kept if bias is None else y_kept + bias
    if bias is None:
        y = y_kept.new_zeros(*y_kept.shape[:-1], out_features)
    else:
        y = bias.expand(*y_kept.shape[:-1], out_features).clone()
    y[..., rows] += y_kept
    return y


def linear_reference(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                     out_features: int) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= GATHER_MAX_TOKENS:
        y = (x2[:, indices.long()] * values).sum(dim=-1)
    else:
        dense = values.new_zeros(values.shape[0], x.shape[-1]).scatter_(1, indices.long(), values)
        y = x2 @ dense.t()
    return _scatter_rows(y, rows, bias, out_features).reshape(*x.shape[:-1], out_features)


def conv2d_reference(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                     out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], groups: int) -> Tensor:
    fan_in = (x.shape[-3] // groups) * kernel_size[0] * kernel_size[1]
    weight = formats.decode_fanin(values, indices, rows, out_channels, fan_in)
    weight = weight.reshape(out_channels, x.shape[-3] // groups, *kernel_size)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def linear_densify(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                   out_features: int) -> Callable[[Tensor], Tensor]:
    weight = formats.decode_fanin(values, indices, rows, out_features, x.shape[-1])
    return lambda x: F.linear(x, weight, bias)


def conv2d_densify(x: Tensor, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                   out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
                   dilation: list[int], groups: int) -> Callable[[Tensor], Tensor]:
    fan_in = (x.shape[-3] // groups) * kernel_size[0] * kernel_size[1]
    weight = formats.decode_fanin(values, indices, rows, out_channels, fan_in)
    weight = weight.reshape(out_channels, x.shape[-3] // groups, *kernel_size)
    return lambda x: F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def random_mask(weight: Tensor, density: float, ablate: float, generator: torch.Generator) -> Tensor:
    """A random constant fan-in mask: ``round(density * fan_in)`` inputs per live row, a fraction ``ablate`` of
    rows all zero (the samples' masks; magnitude masks are `sparsecc.tooling.synthetic`'s)."""
    rows = weight.reshape(weight.shape[0], -1)
    k = max(1, round(density * rows.shape[1]))
    keep = torch.rand(rows.shape, generator=generator).argsort(dim=1)[:, :k]
    mask = torch.zeros(rows.shape, dtype=torch.bool).scatter_(1, keep, True)
    mask[torch.randperm(rows.shape[0], generator=generator)[:round(ablate * rows.shape[0])]] = False
    return mask.reshape(weight.shape)


def _encoded(weight: Tensor, mask: Tensor) -> formats.FanIn:
    flat = mask.reshape(mask.shape[0], -1)
    return formats.encode_fanin((weight * mask).reshape(mask.shape[0], -1), flat, int(flat.sum(1).max()))


def linear_samples(g: torch.Generator, dtype: torch.dtype) -> list[tuple[str, tuple, Tensor]]:
    cases = []
    for out, inp, tokens, density, bias in ((24, 40, (1,), 0.25, True), (24, 40, (33,), 0.25, False),
                                            (16, 64, (2, 5), 0.1, True)):
        w = torch.randn(out, inp, generator=g, dtype=dtype)
        mask = random_mask(w, density, 0.25, g)
        enc = _encoded(w, mask)
        b = torch.randn(out, generator=g, dtype=dtype) if bias else None
        x = torch.randn(*tokens, inp, generator=g, dtype=dtype)
        cases.append((f"{out}x{inp} tokens={tokens}", (x, enc.values, enc.indices, enc.rows, b, out),
                      F.linear(x, w * mask, b)))
    return cases


def conv2d_samples(g: torch.Generator, dtype: torch.dtype) -> list[tuple[str, tuple, Tensor]]:
    cases = []
    for cin, cout, k, stride, pad, dil, groups, hw in ((12, 8, 3, 2, 1, 1, 2, 9), (6, 10, 3, 1, 1, 1, 1, 7),
                                                       (8, 8, 1, 1, 0, 1, 1, 5), (4, 6, 3, 1, 2, 2, 1, 8)):
        w = torch.randn(cout, cin // groups, k, k, generator=g, dtype=dtype)
        mask = random_mask(w, 0.5, 0.25, g)
        enc = _encoded(w, mask)
        x = torch.randn(2, cin, hw, hw, generator=g, dtype=dtype)
        args = (x, enc.values, enc.indices, enc.rows, None, cout, [k, k], [stride] * 2, [pad] * 2, [dil] * 2, groups)
        cases.append((f"conv {cin}->{cout} k{k} s{stride} p{pad} d{dil} g{groups}", args,
                      F.conv2d(x, w * mask, None, stride, pad, dil, groups)))
    return cases


LINEAR = Op("condensed_linear", linear_op, linear_reference, linear_samples, densify=linear_densify)
CONV2D = Op("condensed_conv2d", conv2d_op, conv2d_reference, conv2d_samples, densify=conv2d_densify,
            tokens=lambda x: x.shape[-1] * x.shape[-2])


# -- condensed layers ------------------------------------------------------------------------------------------

class CondensedLinear(CondensedLayer):
    """Constant fan-in Linear: values/indices for kept rows, ablated rows emit their bias."""

    op = LINEAR.name
    kind = "linear"
    gathers = True
    _dims, _axis = 1, -1

    def __init__(self, name: str, weight_fqn: str, bias_fqn: Optional[str], enc: formats.FanIn,
                 bias: Optional[Tensor], weight_shape: tuple[int, int]) -> None:
        super().__init__(name, weight_fqn, bias_fqn, weight_shape)
        self.out_features, self.in_features = weight_shape
        self.register_buffer("values", enc.values)
        self.register_buffer("indices", enc.indices)
        self.register_buffer("rows", enc.rows)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _constants(self) -> tuple:
        return self.values, self.indices, self.rows, self.bias, self.weight_shape[0]

    def _dense_weight(self) -> Tensor:
        return formats.decode_fanin(self.values, self.indices, self.rows, *self.weight_shape)

    def _dense_op(self) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
        return F.linear


class CondensedConv2d(CondensedLayer):
    """Constant fan-in Conv2d over each filter's flattened C/groups*R*S fan-in."""

    op = CONV2D.name
    kind = "conv2d"
    _dims, _axis = 3, -3

    def __init__(self, name: str, weight_fqn: str, bias_fqn: Optional[str], enc: formats.FanIn,
                 bias: Optional[Tensor], weight_shape: tuple[int, int, int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> None:
        super().__init__(name, weight_fqn, bias_fqn, weight_shape)
        self.register_buffer("values", enc.values)
        self.register_buffer("indices", enc.indices)
        self.register_buffer("rows", enc.rows)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups
        self.in_size = self.in_channels = weight_shape[1] * groups
        self.out_channels, self.kernel_size = weight_shape[0], tuple(weight_shape[2:])

    def _constants(self) -> tuple:
        return (self.values, self.indices, self.rows, self.bias, self.weight_shape[0], list(self.weight_shape[2:]),
                self.stride, self.padding, self.dilation, self.groups)

    def _dense_weight(self) -> Tensor:
        fan_in = self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3]
        return formats.decode_fanin(self.values, self.indices, self.rows, self.weight_shape[0], fan_in)

    def _dense_op(self) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
        return functools.partial(F.conv2d, stride=self.stride, padding=self.padding, dilation=self.dilation,
                                 groups=self.groups)


# -- rules -----------------------------------------------------------------------------------------------------

def encode(src: Source, k: int) -> formats.FanIn:
    w, m = src.weight.detach(), src.layer.mask.to(src.weight.device)
    return formats.encode_fanin(w.reshape(w.shape[0], -1), m.reshape(m.shape[0], -1), k)


def fan_in(src: Source) -> int:
    """The constant fan-in of the layer's live rows (any pattern whose masks have one: 2:4 convolutions too)."""
    counts = reductions.row_counts(src.layer.mask)
    live = counts[counts > 0]
    if live.numel() and not bool((live == live[0]).all()):
        raise NotCondensable(f"2:4 but fan-in varies from {int(live.min())} to {int(live.max())} per filter; "
                             f"sparsecc runs 2:4 convolutions as constant fan-in")
    return int(live[0]) if live.numel() else 0


def linear_rule(src: Source) -> CondensedLayer:
    return CondensedLinear(src.layer.module, src.layer.fqn, src.layer.bias, encode(src, fan_in(src)), src.bias,
                           tuple(src.weight.shape))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise NotCondensable(f"padding_mode={conv.padding_mode!r}; sparsecc's convolutions pad with zeros only")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise NotCondensable("padding='same' with an even kernel pads asymmetrically; use explicit padding")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)  # type: ignore[return-value]


def conv2d_rule(src: Source) -> CondensedLayer:
    conv = src.owner
    assert isinstance(conv, nn.Conv2d)
    padding = _conv_padding(conv)
    return CondensedConv2d(src.layer.module, src.layer.fqn, src.layer.bias, encode(src, fan_in(src)), src.bias,
                           tuple(src.weight.shape), tuple(conv.stride), padding, tuple(conv.dilation),
                           conv.groups)


#: Values + indices per kept row, ablated rows -> bias; Conv2d over C/groups*R*S.
PATTERN = Pattern("fanin", ConstantFanIn, detect, {"linear": linear_rule, "conv2d": conv2d_rule}, (LINEAR, CONV2D),
                  explain)
