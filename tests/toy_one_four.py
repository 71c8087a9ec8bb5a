"""A toy pattern, 1:4 along K for Linears, defined the way a new pattern is added (docs/architecture.md): this
one module and a `sparsecc.core.patterns.register` call. It runs on the reference runtime only (no TVM binding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.core.layers import CondensedLayer
from sparsecc.core.ops import kernel, own, save_constants
from sparsecc.core.patterns import Op, Pattern, Source


@dataclass(frozen=True)
class OneFour:
    """At most one non-zero in every group of 4 consecutive inputs."""

    def __str__(self) -> str:
        return "1:4"


def detect(fqn: str, mask: Tensor) -> Optional[OneFour]:
    if mask.dim() != 2 or mask.shape[1] % 4 or mask.float().mean() < 0.2:
        return None
    return OneFour() if bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) <= 1).all()) else None


def _columns(positions: Tensor) -> Tensor:
    return positions.long() + 4 * torch.arange(positions.shape[1], device=positions.device)


@torch.library.custom_op("sparsecc::one_four_linear", mutates_args=())
def one_four_op(x: Tensor, values: Tensor, positions: Tensor, bias: Optional[Tensor], in_features: int,
                runtime: str) -> Tensor:
    return own(kernel(runtime, OP.name)(x, values, positions, bias, in_features), x, bias)


@one_four_op.register_fake
def _(x, values, positions, bias, in_features, runtime):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _dense(values: Tensor, positions: Tensor, in_features: int) -> Tensor:
    return values.new_zeros(values.shape[0], in_features).scatter_(1, _columns(positions), values)


def _grad(ctx, grad: Tensor):
    values, positions, _, in_features, _ = ctx.constants
    return (grad @ _dense(values, positions, in_features).to(grad.dtype), *[None] * 5)


one_four_op.register_autograd(_grad, setup_context=save_constants)


def reference(x: Tensor, values: Tensor, positions: Tensor, bias: Optional[Tensor], in_features: int) -> Tensor:
    y = (x[..., _columns(positions)] * values).sum(-1)
    return y if bias is None else y + bias


def random_mask(out: int, inp: int, generator: torch.Generator) -> Tensor:
    pick = torch.randint(0, 4, (out, inp // 4), generator=generator)
    return torch.zeros(out, inp // 4, 4, dtype=torch.bool).scatter_(-1, pick[..., None], True).reshape(out, inp)


def encode(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    groups = mask.reshape(mask.shape[0], -1, 4)
    positions = groups.to(torch.uint8).argmax(-1).to(torch.uint8)
    values = torch.gather(weight.reshape(groups.shape), 2, positions.long()[..., None])[..., 0]
    return (values * groups.any(-1)).contiguous(), positions.contiguous()


def samples(g: torch.Generator, dtype: torch.dtype) -> list[tuple[str, tuple, Tensor]]:
    cases = []
    for out, inp, tokens in ((12, 32, (1,)), (8, 64, (2, 7))):
        w = torch.randn(out, inp, generator=g, dtype=dtype)
        mask = random_mask(out, inp, g)
        values, positions = encode(w * mask, mask)
        b = torch.randn(out, generator=g, dtype=dtype)
        x = torch.randn(*tokens, inp, generator=g, dtype=dtype)
        cases.append((f"{out}x{inp}", (x, values, positions, b, inp), F.linear(x, w * mask, b)))
    return cases


OP = Op("one_four_linear", one_four_op, reference, samples)


class OneFourLinear(CondensedLayer):
    op = OP.name
    kind = "linear"
    _dims, _axis = 1, -1

    def __init__(self, src: Source) -> None:
        super().__init__(src.layer.module, src.layer.fqn, src.layer.bias, tuple(src.weight.shape))
        values, positions = encode(src.weight.detach(), src.layer.mask)
        self.register_buffer("values", values)
        self.register_buffer("positions", positions)
        self.register_buffer("bias", None if src.bias is None else src.bias.detach().clone())

    def _constants(self) -> tuple:
        return self.values, self.positions, self.bias, self.weight_shape[1]

    def _dense_weight(self) -> Tensor:
        return _dense(self.values, self.positions, self.weight_shape[1])

    def _dense_op(self) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
        return F.linear


PATTERN = Pattern("1:4", OneFour, detect, {"linear": OneFourLinear}, (OP,), narrows_inputs=False)
