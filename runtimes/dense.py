"""The dense op a condensed layer falls back to, and the dense modules a model keeps, in the fastest form this
CPU has for them.

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

Dense modules with a faster exact form (`MEASURED`: max pools through channels-last) are swapped for modules
that measure their forms per input shape (`measure_layouts`, the compiler's ``layouts`` stage).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecc.runtimes import tuning

log = logging.getLogger("sparsecc")

PLAIN = "plain"
#: The packed Linear form, laid out for 32 tokens (a hint of 1 measured the same at one token and 1.2-1.3x
#: slower at 32-197 tokens on the whole).
PACKED = "packed"
#: The packed Linear form laid out for one token: oneDNN then blocks the weight differently, and per shape that
#: wins or loses by up to 15-45% (bf16, Xeon with AMX, `PACKED` -> this, same process: 768x768 at 32 tokens
#: 97 -> 82 us at 1 thread and 58 -> 50 at 2; 3072 -> 768 at 197 tokens 2 threads 688 -> 633 us; 2048 -> 768 at
#: 197 tokens 1 thread 609 -> 890). So it is a candidate beside `PACKED`, measured per layer like the others.
PACKED_ONE = "packed1"
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


def _packed_linear(weight: Tensor, bias: Optional[Tensor], tokens: int = 32) -> Callable[[Tensor], Tensor]:
    """oneDNN's Linear on ``weight`` laid out for calls of ``tokens`` tokens (right for any)."""
    op, packed = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight(weight, tokens)
    return lambda x: op(x, packed, bias, "none", [], "")


def _packed_conv(weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
                 x: Tensor) -> Callable[[Tensor], Tensor]:
    """oneDNN writes channels-last: the form returns the input's layout (for an input in torch's, the copy back
    is part of what is measured)."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    shape = list(x.shape) if x.dim() == 4 else [1, *x.shape]
    op = torch.ops.mkldnn._convolution_pointwise
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, dilation, groups, shape)

    def run(x: Tensor) -> Tensor:
        if x.dim() == 3:
            return op(x.unsqueeze(0), packed, bias, padding, stride, dilation, groups, "none", [], "")[0].contiguous()
        y = op(x, packed, bias, padding, stride, dilation, groups, "none", [], "")
        return y if is_channels_last(x) else y.contiguous()    # a channels-last input gets its layout back
    return run


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a 4-D tensor in channels-last memory (and not also in torch's default layout): the
    inputs whose convolutions answer in channels-last, as torch's own do."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


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
    """``F.linear``, and oneDNN's Linear on a weight packed for 32 tokens or for one (`PACKED`, `PACKED_ONE`)
    for calls of more than `tuning.DECODE_TOKENS` tokens."""

    #: form name -> the token count its weight is laid out for
    LAYOUTS = {PACKED: 32, PACKED_ONE: 1}

    def __init__(self, weight: Callable[[], Tensor], bias: Optional[Tensor]) -> None:
        super().__init__(weight, bias, F.linear)

    def candidates(self, x: Tensor, tokens: int) -> tuple[str, ...]:
        return (PLAIN, *self.LAYOUTS) if tokens > tuning.DECODE_TOKENS and _packable(x) else (PLAIN,)

    def _packed(self, name: str, weight: Tensor, x: Tensor) -> Callable[[Tensor], Tensor]:
        return _packed_linear(weight, self.bias, self.LAYOUTS[name])


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


#: The pooling form that runs on a channels-last copy of the input and returns torch's layout again.
CHANNELS_LAST = "channels_last"

_pool_tuning: Optional[tuning.TuningCache] = None


def pool_tuning_cache() -> tuning.TuningCache:
    """Choices of dense ops that no condensed layer owns (pooling layouts): keyed on the CPU and torch's version,
    beside the layers' choices on disk."""
    global _pool_tuning
    if _pool_tuning is None:
        from sparsecc.core.files import cache_root
        from sparsecc.runtimes import cpu

        _pool_tuning = tuning.TuningCache({"runtime": "dense ops", **cpu.identity(), "torch": torch.__version__},
                                          cache_root() / "tuning")
    return _pool_tuning


def forget_caches() -> None:
    """Drop this process's dense-op choices: the next use reads them from disk again."""
    global _pool_tuning
    _pool_tuning = None


def max_pool_forms(pool: Callable[[Tensor], Tensor], x: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """A 2-D max pool's forms for calls like ``x``: torch's kernel on its own layout, and (for a 4-D input in
    torch's contiguous layout) the same kernel on a channels-last copy, copied back. torch's NCHW max pool
    runs a scalar loop per channel; its channels-last kernel is vectorised over channels, and the two copies
    cost less than the difference (ResNet-50's 3x3/2 pool at 112x112x64, Xeon with AVX-512, 1 thread: 5.3 ms
    in place, 1.6-1.9 ms through channels-last; 2 threads 2.5 vs 0.75 ms). Both take the maximum of the same
    values (NaN included), so they agree exactly. oneDNN's own pool (0.95 ms) is not offered: it drops NaN."""
    forms = {PLAIN: pool}
    if x.dim() == 4 and x.is_contiguous():
        forms[CHANNELS_LAST] = lambda x: pool(x.contiguous(memory_format=torch.channels_last)).contiguous()
    return forms


class MeasuredMaxPool2d(nn.MaxPool2d):
    """`nn.MaxPool2d` whose eager calls run the form of the pool (`max_pool_forms`) measured fastest for their
    input shape, dtype and thread count on first use (cached on disk with the CPU in the key, like a condensed
    layer's choices). The forms agree exactly, so the model's answers do not change; traced, compiled,
    gradient-taking and index-returning calls run torch's own module."""

    @classmethod
    def of(cls, pool: nn.MaxPool2d) -> "MeasuredMaxPool2d":
        """The same pool (kernel, stride, padding, dilation, ceil mode, indices), measured."""
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)

    def forward(self, x: Tensor):
        if self.return_indices or torch.compiler.is_compiling() or type(x) is not Tensor or not x.is_cpu \
                or (x.requires_grad and torch.is_grad_enabled()):
            return super().forward(x)
        routes = self.__dict__.setdefault("_routes", {})
        key = (x.shape, x.dtype, x.is_contiguous(), torch.get_num_threads())
        route = routes.get(key)
        if route is None:
            route = routes[key] = self._route(x)
        return route(x)

    def _route(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        forms = max_pool_forms(self._pool, x)
        if len(forms) == 1:
            return forms[PLAIN]
        signature = ("max_pool2d", self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                     tuple(x.shape), str(x.dtype).removeprefix("torch."))
        choice = tuning.choose_tile(pool_tuning_cache(), signature, 1,
                                    {name: (lambda f=f: f(x)) for name, f in forms.items()})
        self.__dict__.setdefault("_chosen", {})[tuple(x.shape)] = choice.tile
        return forms[choice.tile]

    def _pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)

    def chosen(self) -> dict:
        """The form measured fastest per input shape so far."""
        return dict(self.__dict__.get("_chosen", {}))

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_routes", None)     # closures over measured forms: rebuilt on first use after unpickling
        return state


#: Dense modules the model keeps that have faster exact forms here: exact type -> the module measuring them (a
#: subclass has its own forward and is left alone).
MEASURED: dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.MaxPool2d: MeasuredMaxPool2d.of,     # torch's NCHW max pool is a scalar loop; channels-last is vectorised
}


def measure_layouts(module: nn.Module) -> list[str]:
    """Swap the modules of ``module`` that `MEASURED` covers (every path of a shared one); their paths."""
    swapped = []
    for name, sub in list(module.named_modules(remove_duplicate=False)):
        rule = MEASURED.get(type(sub))
        if rule is not None and name:
            module.set_submodule(name, rule(sub))
            swapped.append(name)
    return swapped
