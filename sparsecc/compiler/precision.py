"""``compile(..., precision="bf16")``: an fp32 model run in bfloat16, as OpenVINO's default does on AMX CPUs.

The condensed layers hold bf16 values (half the bytes a call streams; the TVM kernels widen them to float32 in
registers) and take their input in bf16; every other op runs under CPU autocast to bf16 (oneDNN's AMX GEMMs
for the dense layers, float32 where autocast keeps it: softmax, norms). Floating outputs are returned in the
model's own dtype, so callers see the same types as from the fp32 model; the state objects among them that
the model reads back on its next call (a Hugging Face KV cache) stay as computed, bf16 where autocast computed
them: converting a cache on every decode step would copy all of it, and the next step would cast it back.
Validation compares with the user's fp32 model at `TOLERANCE` (relative to max |output|), which the report
states, cache tensors by value; each condensed layer is checked against its dense op in bf16.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn

from sparsecc.core.errors import InputError

#: ``precision=`` name -> the dtype the model runs in (None: the model's own, no autocast).
PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16}
#: End-to-end tolerance against the fp32 model, relative to max |output|: bf16 keeps 8 bits of mantissa (a
#: relative rounding of 2^-9 per value), and a deep network's layers add their roundings up.
TOLERANCE = 6e-2


#: CPU extensions (`sparsecc.runtimes.cpu.ISA` names) that do bf16 arithmetic. On an x86 CPU with neither, torch's
#: bf16 ops convert as they go, and ``precision="bf16"`` ran slower than the default (AMD EPYC Zen 3, AVX2, vs dense
#: fp32 eager at 1 thread: ViT-B/16 at 90% fan-in 1.58x in bf16 against 2.43x in fp32; at 2:4 0.52x against 1.03x).
BF16_ISA = ("avx512_bf16", "amx_bf16")


def slow_note(precision: str) -> Optional[str]:
    """What the report says when ``precision`` asks for bf16 on an x86 CPU without bf16 arithmetic (`BF16_ISA`):
    the option is honoured, but on this CPU it costs speed, and a user asking for it wants speed."""
    from sparsecc.runtimes import cpu

    have = set(cpu.isa())
    if PRECISIONS.get(precision) is not torch.bfloat16 or "avx" not in have or have & set(BF16_ISA):
        return None
    return (f"precision {precision}: this CPU has no bf16 arithmetic (neither AVX512_BF16 nor AMX), so bf16 ops "
            f"convert as they go and usually run slower than float32 here (an AVX2 EPYC: ViT-B/16 at 90% fan-in "
            f"1.58x dense fp32 in bf16, 2.43x at the default precision); compile at the default precision for speed")


def check(precision: str, model: nn.Module, on_engine: bool) -> Optional[torch.dtype]:
    """The dtype ``precision`` asks for, or None; `InputError` where the request cannot be honoured."""
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}: choose one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    if on_engine:
        raise InputError(f"precision={precision!r} is for the op runtimes; an engine exports in its own precision "
                         f"(backend='tensorrt' builds fp16)")
    own = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if own - {torch.float32}:
        raise InputError(f"precision={precision!r} runs a float32 model in {dtype}; this model's parameters are "
                         f"{sorted(map(str, own))}: compile it as it is (its layers already run in its dtype)")
    return dtype


def convert_layers(module: nn.Module, dtype: torch.dtype) -> int:
    """Condensed layers to ``dtype``: their floating buffers converted, their input cast on the way in. Returns
    how many."""
    from sparsecc.core.layers import CondensedLayer

    count = 0
    for layer in module.modules():
        if isinstance(layer, CondensedLayer):
            for name, buf in list(layer._buffers.items()):
                if buf is not None and buf.is_floating_point():
                    layer._buffers[name] = buf.to(dtype)
            layer.input_cast = True
            layer.__dict__.pop("_bound", None)
            layer.__dict__.pop("_dense", None)
            count += 1
    return count


#: Dense modules whose forward autocast runs in ``dtype`` (exact types: a subclass may compute something else).
AUTOCAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_dense(module: nn.Module, dtype: torch.dtype) -> int:
    """The dense Linears and convolutions the model keeps, with their parameters in ``dtype`` once: autocast
    would cast them on every call (ResNet-50's dense fc, 2M weights, and stem cost about 1 ms a call in bf16),
    and computes the same from the cast copies. New parameters on the compiled copy's modules: the user's
    model keeps its own. Returns how many modules."""
    count = 0
    for path, m in list(module.named_modules(remove_duplicate=False)):
        if path and type(m) in AUTOCAST_MODULES:
            # A new module at this path: the original is shared with the float32 reference validation runs.
            twin = copy.copy(m)
            twin.__dict__["_parameters"] = {
                name: nn.Parameter(p.detach().to(dtype), requires_grad=False)
                if p is not None and p.is_floating_point() else p for name, p in m._parameters.items()}
            module.set_submodule(path, twin)
            count += 1
    return count


def to_channels_last(x: Any) -> Any:
    """A 4-D floating tensor in channels-last memory (the same values); anything else as it is."""
    if isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point():
        return x.contiguous(memory_format=torch.channels_last)
    return x


def to_torch_layout(x: Any) -> Any:
    """A 4-D tensor in torch's default (contiguous) layout again; anything else as it is."""
    if isinstance(x, Tensor) and x.dim() == 4 and not x.is_contiguous():
        return x.contiguous()
    return x


def convolutional(module: nn.Module) -> bool:
    """Whether ``module`` is a convolutional network: more 2-D convolutions (condensed or not) than Linears."""
    from sparsecc.core.layers import CondensedLayer

    convs = linears = 0
    for m in module.modules():
        kind = m.kind if isinstance(m, CondensedLayer) else type(m)
        convs += kind in ("conv2d", nn.Conv2d)
        linears += kind in ("linear", nn.Linear)
    return convs > linears


def channels_last(gm: fx.GraphModule) -> int:
    """Run ``gm`` on channels-last activations: every input converted on the way in (4-D floating ones; the rest
    pass), every output back to torch's layout on the way out. Returns how many inputs it converts.

    oneDNN's bf16 convolutions (AMX) compute in channels-last: given torch's default layout they reorder their
    input and output on every call, and torch's own ops between them (ReLU, residual adds, pools) keep whatever
    layout they get. Measured on the Xeon (1 thread, ResNet-50 90%): dense torch bf16 2.50x dense fp32 in
    channels-last vs 1.46x in the default layout; `precision="bf16"` 3.13x channels-last vs 2.04x."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        with gm.graph.inserting_after(placeholders[-1]):
            converted = gm.graph.call_function(to_channels_last, (node,))
        node.replace_all_uses_with(converted, delete_user_cb=lambda user: user is not converted)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        output.args = fx.node.map_arg(output.args, lambda n: gm.graph.call_function(to_torch_layout, (n,)))
    gm.recompile()
    return len(placeholders)


@contextlib.contextmanager
def running(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """CPU autocast to ``dtype`` (nothing for None)."""
    if dtype is None:
        yield
        return
    with torch.autocast("cpu", dtype=dtype):
        yield


def restore(outputs: Any, dtype: Optional[torch.dtype], original: torch.dtype = torch.float32) -> Any:
    """Floating output tensors of ``dtype`` back in the model's own dtype (the pytree leaves: objects pytree does
    not know, a KV cache, are left as they are)."""
    if dtype is None:
        return outputs
    return pytree.tree_map(lambda t: t.to(original) if isinstance(t, Tensor) and t.dtype == dtype else t, outputs)


def call(fn: Callable[..., Any], dtype: Optional[torch.dtype], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` at ``dtype``, outputs in float32 again."""
    if dtype is None:
        return fn(*args, **kwargs)
    with running(dtype):
        out = fn(*args, **kwargs)
    return restore(out, dtype)


class AtPrecision(nn.Module):
    """``module`` called at ``dtype`` (what the compiled model does on each call), for the stages that run it
    before it is wrapped: tuning and validation. Its submodules are ``module``'s."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return call(self.module, self.dtype, *args, **kwargs)

