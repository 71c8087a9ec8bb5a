"""The dense op a condensed layer falls back to, in the fastest form this CPU has for it.

`F.linear` on a CPU hands oneDNN the weight in torch's layout, and oneDNN lays it out again for its kernel on
every call. Laid out once (`torch.ops.mkldnn._reorder_linear_weight`, run by ``_linear_pointwise``), the same
GEMM measured (Xeon with AMX, 768-2048 wide, one call's median) 1.3-1.8x faster in bf16 at 1-197 tokens,
bit-identical; 1.02-1.3x in fp32 and fp16 at 32-197 tokens, and 0.4-0.8x at one token, where F.linear's own
path wins. In a model the fp32 gain did not hold, so only bf16 layers have packed forms (`_PACKABLE`). Where
they do, a call's forms are candidates measured per layer shape, token bucket and thread count
(`tuning.choose_tile`, like the sparse kernel's tiles), and the dense op a layer is compared against, and runs
where it wins, is the fastest of them; decode-sized calls keep the plain form (`tuning.DECODE_TOKENS`). That keeps
"never slower than dense" against the user's own `nn.Linear`, and makes a layer that runs dense by choice
faster than it where packing pays.

Each packed form is a copy of the weight (oneDNN's opaque tensor: never saved, rebuilt on first use in a new
process); `DenseForms.keep` drops those no choice runs.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.runtimes import tuning

log = logging.getLogger("sparsecc")

PLAIN = "plain"
#: The packed Linear form, laid out for 32 tokens (a hint of 1 measured the same at one token and 1.2-1.3x
#: slower at 32-197 tokens).
PACKED = "packed"
#: Decode-sized calls (`tuning.DECODE_TOKENS`) are offered the plain form only. Measured warm, a packed
#: weight of a one-token call sits in L2 and beats the sparse kernel; in the model it does not (each layer's
#: weight leaves L2 before its next call), and a second copy of every weight crowds the last-level cache: a bf16
#: decoder at 2:4 decoded at 1.17x dense with one-token calls on packed forms, 1.35x without (one thread).
#: Dtypes offered the packed forms. fp32 and fp16 packed Linears measured 1.02-1.3x torch's op alone (32-197
#: tokens) but lost in a model: all-MiniLM-L6-v2 at 2:4 in fp32 (16 and 128 tokens, its layers dense by choice)
#: ran 0.93-0.95x dense with packed forms chosen, 0.95-0.97x with torch's op in their place (same process,
#: interleaved). bf16's gain (1.3-1.8x alone, AMX) holds in models: a bf16 decoder's prefill 0.98x -> 1.07x.
_PACKABLE = (torch.bfloat16,)


@functools.cache
def packs(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run packed Linears and convolutions in ``dtype`` and get torch's answer
    (checked once on small layers: a CPU without bf16 in oneDNN, or a torch without mkldnn, runs the plain
    forms only)."""
    if dtype not in _PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(*shape, generator=g).to(dtype) for shape in ((24, 40), (24,), (3, 40)))
        torch.testing.assert_close(_packed_linear(w, b)(x), F.linear(x, w, b), rtol=1e-2, atol=1e-2)
        w, x = (torch.randn(*shape, generator=g).to(dtype) for shape in ((24, 8, 3, 3), (1, 8, 6, 5)))
        torch.testing.assert_close(_packed_conv(w, b, (1, 1), (1, 1), (1, 1), 1, x)(x), F.conv2d(x, w, b, 1, 1),
                                   rtol=1e-2, atol=1e-2)
        return True
    except Exception as exc:  # noqa: BLE001 - no packed form here: the plain op is what runs
        log.info("sparsecc: no packed dense ops in %s here (%s: %s)", dtype, type(exc).__name__, exc)
        return False


def _packed_linear(weight: Tensor, bias: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    op, packed = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight(weight, 32)
    return lambda x: op(x, packed, bias, "none", [], "")


def _packed_conv(weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
                 x: Tensor) -> Callable[[Tensor], Tensor]:
    """oneDNN writes channels-last: the form returns torch's layout (the copy is part of what is measured)."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    shape = list(x.shape) if x.dim() == 4 else [1, *x.shape]
    op = torch.ops.mkldnn._convolution_pointwise
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, dilation, groups, shape)

    def run(x: Tensor) -> Tensor:
        if x.dim() == 3:
            return op(x.unsqueeze(0), packed, bias, padding, stride, dilation, groups, "none", [], "")[0].contiguous()
        return op(x, packed, bias, padding, stride, dilation, groups, "none", [], "").contiguous()
    return run


class DenseForms:
    """One layer's dense op by form name, each built on first use. ``weight`` decodes the dense weight (called
    when a form needs it); ``plain`` runs the op as torch does on it; subclasses add the packed forms."""

    def __init__(self, weight: Callable[[], Tensor], bias: Optional[Tensor],
                 plain: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]) -> None:
        self._decode, self.bias, self._plain = weight, bias, plain
        self._weight: Optional[Tensor] = None
        self._forms: dict[str, Callable[[Tensor], Tensor]] = {}

    def weight(self) -> Tensor:
        if self._weight is None:
            self._weight = self._decode()
        return self._weight

    def candidates(self, x: Tensor, tokens: int) -> tuple[str, ...]:
        """The forms a call on ``x`` (``tokens`` tokens) is measured over."""
        return (PLAIN,)

    def form(self, name: str, x: Tensor) -> Callable[[Tensor], Tensor]:
        """The form ``name``, built for calls like ``x`` on first use."""
        fn = self._forms.get(name)
        if fn is None:
            weight = self.weight()
            if name == PLAIN:
                plain, bias = self._plain, self.bias
                fn = lambda x: plain(x, weight, bias)  # noqa: E731
            else:
                fn = self._packed(name, weight, x)
            self._forms[name] = fn
        return fn

    def _packed(self, name: str, weight: Tensor, x: Tensor) -> Callable[[Tensor], Tensor]:
        raise KeyError(name)

    def keep(self, names: set[str]) -> None:
        """Drop the forms not in ``names`` (and the decoded weight, when only packed forms are left: each is a
        copy of the layer's weight)."""
        for name in [n for n in self._forms if n not in names]:
            del self._forms[name]
        if PLAIN not in self._forms:
            self._weight = None

    def held(self) -> tuple[str, ...]:
        return tuple(sorted(self._forms))


def _packable(x: Tensor) -> bool:
    return x.device.type == "cpu" and packs(x.dtype)


class LinearForms(DenseForms):
    """``F.linear``, and oneDNN's Linear on a packed weight for calls of more than `tuning.DECODE_TOKENS` tokens."""

    def __init__(self, weight: Callable[[], Tensor], bias: Optional[Tensor]) -> None:
        super().__init__(weight, bias, F.linear)

    def candidates(self, x: Tensor, tokens: int) -> tuple[str, ...]:
        return (PLAIN, PACKED) if tokens > tuning.DECODE_TOKENS and _packable(x) else (PLAIN,)

    def _packed(self, name: str, weight: Tensor, x: Tensor) -> Callable[[Tensor], Tensor]:
        if name != PACKED:
            raise KeyError(name)
        return _packed_linear(weight, self.bias)


class ConvForms(DenseForms):
    """``F.conv2d`` with the layer's geometry, and oneDNN's convolution on a weight packed for the first call's
    input shape (oneDNN lays it out again for another shape: still right, slower)."""

    def __init__(self, weight: Callable[[], Tensor], bias: Optional[Tensor], stride, padding, dilation,
                 groups: int) -> None:
        super().__init__(weight, bias, functools.partial(F.conv2d, stride=stride, padding=padding,
                                                         dilation=dilation, groups=groups))
        self.geometry = (stride, padding, dilation, groups)

    def candidates(self, x: Tensor, tokens: int) -> tuple[str, ...]:
        return (PLAIN, PACKED) if _packable(x) and x.dim() in (3, 4) else (PLAIN,)

    def _packed(self, name: str, weight: Tensor, x: Tensor) -> Callable[[Tensor], Tensor]:
        if name != PACKED:
            raise KeyError(name)
        return _packed_conv(weight, self.bias, *self.geometry, x)
