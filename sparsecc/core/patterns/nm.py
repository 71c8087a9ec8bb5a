"""2:4 along K (NVIDIA ASP, SparseGPT / Wanda 2:4): at most 2 non-zeros in every group of 4 consecutive weights
along the input axis (Linear: in; Conv2d: C, as TensorRT reads it).

Op ``nm_linear(x, values[out, in/2], metadata[out, ceil(in/8)] uint8, bias?, in_features, runtime)``: each
group of 4 inputs keeps 2 weights whose positions (2 bits each) fill one nibble of metadata. 2:4 convolutions
condense as constant fan-in ``C*R*S/2`` (`fanin.conv2d_rule`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.core import formats, reductions
from sparsecc.core.layers import CondensedLayer
from sparsecc.core.ops import kernel, own, save_constants
from sparsecc.core.patterns import fanin
from sparsecc.core.patterns.base import NotCondensable, Op, Pattern, Source
from sparsecc.core.structures import NM, Structure

#: A 2:4 mask keeps about half; sparser masks that happen to fit 2:4 condense better as constant fan-in.
MIN_DENSITY = 0.375


def groups_along_k(mask: Tensor, m: int) -> Optional[Tensor]:
    """Counts of non-zeros in every group of ``m`` along K (Linear: in; Conv2d: C), None if K % m != 0."""
    k_last = mask if mask.dim() == 2 else mask.permute(0, 2, 3, 1)
    if k_last.shape[-1] % m:
        return None
    return k_last.reshape(*k_last.shape[:-1], -1, m).sum(dim=-1, dtype=torch.int32)


def detect(fqn: str, mask: Tensor) -> Optional[Structure]:
    if reductions.density(mask) < MIN_DENSITY:
        return None
    counts = groups_along_k(mask, 4)
    if counts is None:
        return None
    return NM(2, 4, axis=1) if reductions.all_set(counts <= 2) else None


def explain(mask: Tensor) -> str:
    """Why a half-dense mask is not 2:4 (nothing for masks far from half dense)."""
    if abs(float(mask.float().mean()) - 0.5) >= 0.1:
        return ""
    groups = groups_along_k(mask, 4)
    if groups is None:
        return f"not 2:4: {'in_features' if mask.dim() == 2 else 'channels'} {mask.shape[1]} is not a multiple of 4"
    why = ""
    over = torch.nonzero(groups > 2)
    if over.numel():
        bad = over[0].tolist()
        why = f"not 2:4: row {bad[0]}, group {bad[-1]} along K has {int(groups[tuple(bad)])} non-zeros"
    along_out = groups_along_k(mask.transpose(0, 1), 4) if mask.dim() == 2 else None
    if along_out is not None and bool((along_out <= 2).all()):
        why += " (it is 2:4 along the output axis; sparsecc and TensorRT need it along K)"
    return why.strip()


@torch.library.custom_op("sparsecc::nm_linear", mutates_args=())
def linear_op(x: Tensor, values: Tensor, metadata: Tensor, bias: Optional[Tensor], in_features: int,
              runtime: str) -> Tensor:
    # contiguous, as the fake says (inductor checks a custom op's output strides against it)
    return own(kernel(runtime, LINEAR.name)(x, values, metadata, bias, in_features).contiguous(), x, bias)


@linear_op.register_fake
def _(x, values, metadata, bias, in_features, runtime):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _grad(ctx, grad: Tensor):
    values, metadata, _, in_features, _ = ctx.constants
    indices = formats.nm_indices(metadata, in_features)
    weight = formats.decode_fanin(values, indices, None, values.shape[0], in_features)
    return (grad @ weight.to(grad.dtype), *[None] * 5)


linear_op.register_autograd(_grad, setup_context=save_constants)


def linear_reference(x: Tensor, values: Tensor, metadata: Tensor, bias: Optional[Tensor], in_features: int) -> Tensor:
    indices = formats.nm_indices(metadata, in_features)
    return fanin.linear_reference(x, values, indices, None, bias, values.shape[0])


def densify(x: Tensor, values: Tensor, metadata: Tensor, bias: Optional[Tensor], in_features: int
            ) -> Callable[[Tensor], Tensor]:
    weight = formats.decode_fanin(values, formats.nm_indices(metadata, in_features), None, values.shape[0],
                                  in_features)
    return lambda x: F.linear(x, weight, bias)


def random_mask(weight: Tensor, generator: torch.Generator) -> Tensor:
    """A random 2:4 mask along K (2 of each group of 4 inputs)."""
    groups = torch.rand(weight.shape[0], weight.shape[1] // 4, 4, generator=generator)
    keep = groups.argsort(dim=-1)[..., :2]
    return torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, keep, True).reshape(weight.shape)


def samples(g: torch.Generator, dtype: torch.dtype) -> list[tuple[str, tuple, Tensor]]:
    cases = []
    for out, inp, tokens in ((24, 64, (1,)), (24, 40, (3,)), (16, 128, (2, 40))):
        w = torch.randn(out, inp, generator=g, dtype=dtype)
        mask = random_mask(w, g)
        values, metadata = formats.encode_nm(w * mask, mask)
        b = torch.randn(out, generator=g, dtype=dtype)
        x = torch.randn(*tokens, inp, generator=g, dtype=dtype)
        cases.append((f"{out}x{inp} tokens={tokens}", (x, values, metadata, b, inp), F.linear(x, w * mask, b)))
    return cases


LINEAR = Op("nm_linear", linear_op, linear_reference, samples, densify=densify)


class NMLinear(CondensedLayer):
    """2:4 Linear along K: half the values plus 2-bit positions."""

    op = LINEAR.name
    kind = "linear"
    _dims, _axis = 1, -1

    def __init__(self, name: str, weight_fqn: str, bias_fqn: Optional[str], values: Tensor, metadata: Tensor,
                 bias: Optional[Tensor], weight_shape: tuple[int, int]) -> None:
        super().__init__(name, weight_fqn, bias_fqn, weight_shape)
        self.out_features, self.in_features = weight_shape
        self.register_buffer("values", values)
        self.register_buffer("metadata", metadata)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _constants(self) -> tuple:
        return self.values, self.metadata, self.bias, self.weight_shape[1]

    def _dense_weight(self) -> Tensor:
        indices = formats.nm_indices(self.metadata, self.weight_shape[1])
        return formats.decode_fanin(self.values, indices, None, *self.weight_shape)

    def _dense_op(self) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
        return F.linear


def linear_rule(src: Source) -> CondensedLayer:
    structure = src.analysis.structure
    assert isinstance(structure, NM)
    if structure.axis != 1:
        raise NotCondensable("2:4 along the output axis; sparsecc and TensorRT need it along K (the input axis)")
    values, metadata = formats.encode_nm(src.weight.detach(), src.layer.mask.to(src.weight.device))
    return NMLinear(src.layer.module, src.layer.fqn, src.layer.bias, values, metadata, src.bias,
                    tuple(src.weight.shape))


#: Half the values + 2-bit positions for Linears; an exact 2:4 conv is constant fan-in C*R*S/2. Removing inputs
#: would break the groups of 4.
PATTERN = Pattern("2:4", NM, detect, {"linear": linear_rule, "conv2d": fanin.conv2d_rule}, (LINEAR,), explain,
                  narrows_inputs=False)
