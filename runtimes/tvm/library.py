"""`write_tvm`: a whole compiled model as one TVM shared library that runs without PyTorch.

Pipeline: `torch.export` at the example shapes -> core-ATen
decompositions -> every op neither TVM's importer nor sparsecc translates listed in one `ExportError` ->
`tvm.relax.frontend.torch.from_exported_program` with `converters()`, which turn each ``sparsecc::`` op into
``call_tir`` calls of the same TensorIR kernels the TVM runtime uses (`runtimes/tvm/kernels.py`, their
``parallel`` variants on TVM's thread pool), picked by the same rules (`runtimes.tvm.linear_kernel`, the
bindings' conv paths) with the layer's constants derived the same way (`runtimes/tvm/runtime.py` bindings): token
transposes by the blocked transpose kernel, zero padding and im2col taps as Relax ops. The fan-in kernels also
run dense Linears, convolutions and batched matmuls with identity indices (TVM's CPU lowering leaves them as
naive loops: ResNet-18's dense stem alone took 128 ms, a 197-token 768->3072 matmul 2 s); DLight's CPU rules
schedule the rest -> ``export_library`` to a temporary file, renamed.

The runtime's measured sparse-or-dense choice has no counterpart here: the library's dense path is the same
kernel over every input, strictly more work (768->3072 at 197 tokens, 1 / 2 threads: 2:4 18 / 9.6 ms, dense
50 / 26 ms; at one token 0.32 / 0.20 vs 0.84 / 0.44 ms), so every condensed layer runs its sparse kernel.

Kernels are specialised on token counts, so the library is specialised on the example inputs' shapes.
The library carries its own metadata (a ``sparsecc_meta`` function returning JSON bytes); `runner`
loads it with TVM and numpy only.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from sparsecc.core import ops, patterns
from sparsecc.core.errors import ExportError, InputError, RuntimeUnavailableError
from sparsecc.core.files import atomic_write
from sparsecc.core.inputs import Call
from sparsecc.core.version import __version__
from sparsecc.runtimes.exporting import refuse_missing, writable_target
from sparsecc.runtimes.signature import input_names
from sparsecc.runtimes.tvm import runner as tvm_runner
from sparsecc.runtimes.tvm.runner import FORMAT, META_FUNCTION


@dataclass
class TvmExport:
    """What was written: the library, its input and output shapes, and how many kernel calls it makes per
    ``"op/kernel"`` (``"condensed_linear/spmm"``, ``"bmm/spmm"``, ...)."""

    path: Path
    input_shapes: list[tuple[int, ...]]
    output_shapes: list[tuple[int, ...]]
    kernels: dict[str, int] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)    # forward's parameter names / the keyword keys

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def _static(shape: Any, node: Any) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in shape)
    except TypeError as exc:   # a SymInt without a value
        raise ExportError(f"{node}: TVM kernels are specialised on shapes and this one is symbolic ({shape})") from exc


class _Converter:
    """State shared by the op converters of one export: the program's constant tensors by placeholder name,
    and the TIR kernels already added to the module (one per kernel key)."""

    def __init__(self, program: torch.export.ExportedProgram, target: Any) -> None:
        self.target = target
        state = {**program.state_dict, **program.constants}
        self.tensors: dict[str, Tensor] = {spec.arg.name: state[spec.target]
                                           for spec in program.graph_signature.input_specs
                                           if spec.target is not None and spec.target in state}
        self.functions: dict[str, Any] = {}
        self.kernels: dict[str, int] = {}
        self.op = ""

    def tensor(self, node: Any) -> Optional[Tensor]:
        if node is None:
            return None
        found = self.tensors.get(getattr(node, "name", None))
        if found is None:
            raise ExportError(f"{node}: a sparsecc op's constant is computed in the graph, not a buffer; "
                              f"export_tvm needs the compiled layer's buffers as they are")
        return found

    def kernel(self, builder: Any, key: Any) -> Any:
        from sparsecc.runtimes.tvm import kernels as tvm_kernels

        name = key.name()
        if name not in self.functions:
            # Scheduled (DLight leaves it alone) and opaque (no pass reads a reshape into the transpose).
            func = tvm_kernels.build(key).with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})
            self.functions[name] = builder.add_func(func, name)
        label = f"{self.op}/{key.kind}"
        self.kernels[label] = self.kernels.get(label, 0) + 1
        return self.functions[name]

    def call(self, builder: Any, key: Any, args: list, out_shape: tuple[int, ...], rows: int) -> Any:
        """A kernel over all ``rows`` of its layer, split on TVM's thread pool (the key's ``parallel``)."""
        import tvm
        from tvm import relax

        from sparsecc.runtimes.tvm.kernels import blocks

        span = [relax.prim_value(tvm.tirx.IntImm("int32", v)) for v in (0, blocks(key.kind, rows))]
        return builder.emit(relax.call_tir(self.kernel(builder, key), [*args, *span],
                                           relax.TensorType(out_shape, "float32")))


def _const(t: Tensor) -> Any:
    from tvm import relax

    return relax.const(t.detach().contiguous().cpu().numpy())


def _key(kind: str, k: int, tokens: int, index_dtype: torch.dtype, bias: bool) -> Any:
    from sparsecc.runtimes.tvm import kernels as tvm_kernels

    return tvm_kernels.KernelKey(kind, k, tokens, str(index_dtype).removeprefix("torch."), "float32", bias,
                                 parallel=True)


def _bias_broadcast(builder: Any, bias: Optional[Tensor], shape: tuple[int, ...], channel_dim: int) -> Any:
    """The output of a layer whose every row is ablated: its bias (or zeros) broadcast."""
    from tvm import relax

    if bias is None:
        return relax.const(np.zeros(shape, np.float32))
    view = [1] * len(shape)
    view[channel_dim] = -1
    return builder.emit(relax.op.broadcast_to(_const(bias.reshape(view)), shape))


def _linear_rows(ctx: _Converter, builder: Any, x2: Any, shape: tuple[int, int], bound: Any) -> Any:
    """``[tokens, out]`` from ``x2 = [tokens, in]`` (its ``shape``) through the fan-in kernels, as the TVM runtime
    picks them."""
    from tvm import relax

    from sparsecc.runtimes.tvm.runtime import linear_kernel

    constants = [_const(bound.values), _const(bound.indices), _const(bound.orow), _const(bound.arow),
                 _const(bound.bias)]
    k, idx = bound.values.shape[1], bound.indices.dtype
    tokens = shape[0]
    kind = linear_kernel(tokens)
    if kind != "gemv":
        xt = _transpose(ctx, builder, x2, shape)
        y = ctx.call(builder, _key(kind, k, tokens, idx, bound.has_bias), [xt, *constants], (bound.out, tokens),
                     bound.values.shape[0])
        return _transpose(ctx, builder, y, (bound.out, tokens))
    key = _key("gemv", k, 1, idx, bound.has_bias)
    rows = [ctx.call(builder, key, [_row(builder, x2, t), *constants], (1, bound.out), bound.values.shape[0])
            for t in range(tokens)]
    return rows[0] if tokens == 1 else builder.emit(relax.op.concat(rows, axis=0))


def _transpose(ctx: _Converter, builder: Any, x: Any, shape: tuple[int, int]) -> Any:
    """A float32 matrix transposed by the blocked kernel the TVM runtime uses (TVM's own lowering of
    ``permute_dims`` was a naive loop: most of a 197-token layer's time)."""
    from sparsecc.runtimes.tvm.kernels import VEC

    m, n = shape
    return ctx.call(builder, _key("transpose", 0, 0, torch.int32, False), [x], (n, m), min(m, n) // VEC)


def _row(builder: Any, x2: Any, t: int) -> Any:
    from tvm import relax

    return builder.emit(relax.op.strided_slice(x2, axes=[0], begin=[t], end=[t + 1]))


def fanin_linear(ctx: _Converter, node: Any, importer: Any) -> Any:
    from tvm import relax

    from sparsecc.runtimes.tvm.runtime import BoundLinear

    builder = importer.block_builder
    x = importer.env[node.args[0]]
    shape = _static(node.args[0].meta["val"].shape, node)
    values, indices, rows, bias = (ctx.tensor(a) for a in node.args[1:5])
    out = int(node.args[5])
    if values.shape[0] == 0:
        return _bias_broadcast(builder, bias, (*shape[:-1], out), -1)
    tokens = math.prod(shape[:-1])
    x2 = builder.emit(relax.op.reshape(x, (tokens, shape[-1])))
    y = _linear_rows(ctx, builder, x2, (tokens, shape[-1]), BoundLinear(values, indices, rows, bias, out))
    return builder.emit(relax.op.reshape(y, (*shape[:-1], out)))


def two_four_linear(ctx: _Converter, node: Any, importer: Any) -> Any:
    from tvm import relax

    from sparsecc.runtimes.tvm.runtime import BoundNM, linear_kernel, nm_kind

    builder = importer.block_builder
    x = importer.env[node.args[0]]
    shape = _static(node.args[0].meta["val"].shape, node)
    values, metadata, bias = (ctx.tensor(a) for a in node.args[1:4])
    in_features = int(node.args[4])
    out = values.shape[0]
    tokens = math.prod(shape[:-1])
    bound = BoundNM(values, metadata, bias, in_features, compile_kernel=False)
    kind = nm_kind(in_features, ctx.target)
    x2 = builder.emit(relax.op.reshape(x, (tokens, in_features)))
    if kind is None or linear_kernel(tokens) != "gemv":
        y = _linear_rows(ctx, builder, x2, (tokens, in_features), bound.fanin)
    else:
        key = _key(kind, in_features // 4, 1, torch.int16, bound.has_bias)
        constants = [_const(bound.values), _const(bound.metadata), _const(bound.bias)]
        rows = []
        for t in range(tokens):
            xt = _row(builder, x2, t)
            if kind == "nm_gemv":     # de-interleaved by position in group, as the portable kernel reads it
                xt = builder.emit(relax.op.permute_dims(builder.emit(relax.op.reshape(xt, (in_features // 4, 4)))))
            rows.append(ctx.call(builder, key, [xt, *constants], (1, out), out))
        y = rows[0] if tokens == 1 else builder.emit(relax.op.concat(rows, axis=0))
    return builder.emit(relax.op.reshape(y, (*shape[:-1], out)))


def _conv_sample(ctx: _Converter, builder: Any, sample: Any, chw: tuple[int, int, int], oh: int, ow: int,
                 bound: Any) -> Any:
    """``[out, oh, ow]`` for one ``[C, H, W]`` sample, with the kernel choice of the TVM runtime."""
    from tvm import relax

    c, h, w = chw
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = bound.padding, bound.stride, bound.dilation, bound.kernel_size
    constants = [_const(bound.values), None, _const(bound.orow), _const(bound.arow), _const(bound.bias)]
    k = bound.values.shape[1]
    if bound.direct:
        # Zero-padded phase planes flattened (stride 1: the padded planes), plus the trailing zeros the last
        # row's taps read; outputs over the planes' width, the extra columns sliced off.
        hq, wq = bound._phases(h, w)
        padded = builder.emit(relax.op.nn.pad(sample, [0, 0, ph, hq * sh - h - ph, pw, wq * sw - w - pw]))
        if (sh, sw) != (1, 1):
            phases = builder.emit(relax.op.reshape(padded, (c, hq, sh, wq, sw)))
            padded = builder.emit(relax.op.permute_dims(phases, [0, 2, 4, 1, 3]))
        flat = builder.emit(relax.op.reshape(padded, (c * sh * sw * hq * wq,)))
        extra = dh * (kh - 1) // sh * wq + dw * (kw - 1) // sw + oh * wq - hq * wq
        if extra > 0:
            flat = builder.emit(relax.op.nn.pad(flat, [0, extra]))
        constants[1] = _const(bound._offsets(h, w))
        y = ctx.call(builder, _key("spmm_flat", k, oh * wq, torch.int32, bound.has_bias), [flat, *constants],
                     (bound.out, oh * wq), bound.values.shape[0])
        y = builder.emit(relax.op.reshape(y, (bound.out, oh, wq)))
        return builder.emit(relax.op.strided_slice(y, axes=[2], begin=[0], end=[ow])) if wq != ow else y
    if bound.pointwise:
        if (sh, sw) != (1, 1):
            sample = builder.emit(relax.op.strided_slice(sample, axes=[1, 2], begin=[0, 0],
                                                         end=[(oh - 1) * sh + 1, (ow - 1) * sw + 1], strides=[sh, sw]))
        cols = builder.emit(relax.op.reshape(sample, (c, oh * ow)))
    elif (sh, sw) == (kh, kw) and (ph, pw) == (0, 0) and (dh, dw) == (1, 1):
        # Non-overlapping patches (ViT's patch embedding): im2col is a reshape and a transpose; slices would be
        # one per tap, 256 of them, and TVM took a minute to compile those.
        if (h, w) != (oh * kh, ow * kw):
            sample = builder.emit(relax.op.strided_slice(sample, axes=[1, 2], begin=[0, 0], end=[oh * kh, ow * kw]))
        patches = builder.emit(relax.op.reshape(sample, (c, oh, kh, ow, kw)))
        cols = builder.emit(relax.op.reshape(builder.emit(relax.op.permute_dims(patches, [0, 2, 4, 1, 3])),
                                             (c * kh * kw, oh * ow)))
    else:
        # im2col in F.unfold's order (channel-major, then taps row by row): one strided slice per tap.
        padded = builder.emit(relax.op.nn.pad(sample, [0, 0, ph, ph, pw, pw])) if ph or pw else sample
        taps = [builder.emit(relax.op.strided_slice(padded, axes=[1, 2], begin=[dy * dh, dx * dw],
                                                    end=[dy * dh + (oh - 1) * sh + 1, dx * dw + (ow - 1) * sw + 1],
                                                    strides=[sh, sw]))
                for dy in range(kh) for dx in range(kw)]
        cols = builder.emit(relax.op.reshape(builder.emit(relax.op.stack(taps, axis=1)), (c * kh * kw, oh * ow)))
    constants[1] = _const(bound.indices)
    y = ctx.call(builder, _key("spmm", k, oh * ow, bound.indices.dtype, bound.has_bias), [cols, *constants],
                 (bound.out, oh * ow), bound.values.shape[0])
    return builder.emit(relax.op.reshape(y, (bound.out, oh, ow)))


def _conv2d(ctx: _Converter, importer: Any, node: Any, values: Tensor, indices: Tensor, rows: Optional[Tensor],
            bias: Optional[Tensor], out: int, kernel_size, stride, padding, dilation, groups: int) -> Any:
    from tvm import relax

    from sparsecc.runtimes.tvm.runtime import BoundConv2d

    builder = importer.block_builder
    x = importer.env[node.args[0]]
    shape = _static(node.args[0].meta["val"].shape, node)
    unbatched = len(shape) == 3
    n, c, h, w = (1, *shape) if unbatched else shape
    oh, ow = (ops.conv_out_size(s, kk, st, p, d) for s, kk, st, p, d in
              zip((h, w), kernel_size, stride, padding, dilation))
    out_shape = (out, oh, ow) if unbatched else (n, out, oh, ow)
    if values.shape[0] == 0:
        return _bias_broadcast(builder, bias, out_shape, -3)
    bound = BoundConv2d(values, indices, rows, bias, int(out), list(kernel_size), list(stride), list(padding),
                        list(dilation), int(groups), in_channels=c)
    if unbatched:
        return _conv_sample(ctx, builder, x, (c, h, w), oh, ow, bound)
    samples = []
    for i in range(n):
        sample = builder.emit(relax.op.reshape(builder.emit(relax.op.strided_slice(x, axes=[0], begin=[i],
                                                                                   end=[i + 1])), (c, h, w)))
        samples.append(_conv_sample(ctx, builder, sample, (c, h, w), oh, ow, bound))
    return builder.emit(relax.op.stack(samples, axis=0))


def fanin_conv2d(ctx: _Converter, node: Any, importer: Any) -> Any:
    values, indices, rows, bias = (ctx.tensor(a) for a in node.args[1:5])
    return _conv2d(ctx, importer, node, values, indices, rows, bias, *node.args[5:11])


def _identity_indices(rows: int, k: int) -> Tensor:
    """The fan-in indices of a dense layer: every input, in order."""
    from sparsecc.core import formats

    return torch.arange(k, dtype=formats.index_dtype(k)).expand(rows, k).contiguous()


def _dense_convolution(ctx: _Converter, node: Any, importer: Any) -> Any:
    """A dense Conv2d with a constant weight runs on the token kernels too (identity indices): TVM's
    unscheduled conv2d loops ran ResNet's stem 20x slower. Anything else goes to TVM's own converter."""
    args = list(node.args) + [None] * (9 - len(node.args))
    weight = ctx.tensors.get(getattr(args[1], "name", None))
    bias = ctx.tensors.get(getattr(args[2], "name", None)) if args[2] is not None else None
    if (weight is None or weight.dim() != 4 or weight.dtype != torch.float32 or args[6]
            or (args[2] is not None and bias is None)):
        return type(importer)._convolution(importer, node)
    out = weight.shape[0]
    values = weight.reshape(out, -1)
    return _conv2d(ctx, importer, node, values, _identity_indices(out, values.shape[1]), None, bias, out,
                   list(weight.shape[2:]), args[3], args[4], args[5], args[8])


def _weight(ctx: _Converter, node: Any) -> Optional[Tensor]:
    """The ``[out, in]`` weight a matmul's right operand holds: a constant's transpose (what ``nn.Linear``
    decomposes to), or a constant ``[in, out]`` matrix; None when it is computed."""
    if getattr(node, "target", None) is torch.ops.aten.permute.default and list(node.args[1]) == [1, 0]:
        weight = ctx.tensors.get(getattr(node.args[0], "name", None))
        return weight if weight is not None and weight.dim() == 2 else None
    weight = ctx.tensors.get(getattr(node, "name", None))
    return weight.t().contiguous() if weight is not None and weight.dim() == 2 else None


def _dense_mm(ctx: _Converter, node: Any, importer: Any) -> Any:
    """A dense Linear (``mm`` / ``addmm`` with a constant weight) on the fan-in kernels with identity indices,
    as the dense convolutions: TVM's CPU lowering of a 197-token matmul was a naive loop (2 s for 768->3072)."""
    from tvm import relax

    from sparsecc.runtimes.tvm.runtime import BoundLinear

    addmm = node.target is torch.ops.aten.addmm.default
    bias_node, x_node, w_node = node.args[:3] if addmm else (None, *node.args[:2])
    weight = _weight(ctx, w_node)
    bias = ctx.tensors.get(getattr(bias_node, "name", None)) if addmm else None
    if (weight is None or weight.dtype != torch.float32 or x_node.meta["val"].dtype != torch.float32
            or any(node.kwargs.get(a, 1) != 1 for a in ("alpha", "beta"))
            or (addmm and (bias is None or bias.shape != weight.shape[:1]))):
        builder = importer.block_builder
        if addmm:
            return type(importer)._addmm(importer, node)
        return builder.emit(relax.op.matmul(importer.env[node.args[0]], importer.env[node.args[1]]))
    out, k = weight.shape
    bound = BoundLinear(weight.contiguous(), _identity_indices(out, k), None, bias, out)
    return _linear_rows(ctx, importer.block_builder, importer.env[x_node], _static(x_node.meta["val"].shape, node),
                        bound)


def _dense_bmm(ctx: _Converter, node: Any, importer: Any) -> Any:
    """Batched float32 matmul (attention's scores and mixing) as one token-kernel call per batch entry: the
    left matrix takes the values' place, the right one the transposed input's."""
    from tvm import relax

    builder = importer.block_builder
    a, b = (importer.env[arg] for arg in node.args[:2])
    (batch, m, k), (_, _, n) = (_static(arg.meta["val"].shape, node) for arg in node.args[:2])
    if node.args[0].meta["val"].dtype != torch.float32:
        return builder.emit(relax.op.matmul(a, b))
    indices = _identity_indices(m, k)
    constants = [_const(indices), _const(torch.arange(m, dtype=torch.int32)), _const(torch.zeros(0, dtype=torch.int32)),
                 _const(torch.zeros(m))]
    key = _key("spmm", k, n, indices.dtype, False)
    outs = []
    # One split per operand (not a slice per entry: each distinct slice became its own compiled function, and
    # ViT-B/16's 576 of them tripled the export time).
    a_parts, b_parts = (_split(builder, t, batch) for t in (a, b))
    for ai, bi in zip(a_parts, b_parts):
        ai = builder.emit(relax.op.reshape(ai, (m, k)))
        bi = builder.emit(relax.op.reshape(bi, (k, n)))
        outs.append(ctx.call(builder, key, [bi, ai, *constants], (m, n), m))
    return builder.emit(relax.op.stack(outs, axis=0))


def _split(builder: Any, t: Any, parts: int) -> list:
    """``t`` split along axis 0 into ``parts`` entries of size 1."""
    from tvm import relax

    if parts == 1:
        return [t]
    tup = builder.emit(relax.op.split(t, parts, axis=0))
    return [builder.emit(relax.TupleGetItem(tup, i)) for i in range(parts)]


#: Dense ops (as TVM's importer names them) whose TVM lowering is left unscheduled on CPU -> converter.
DENSE_CONVERTERS: dict[str, Callable[[_Converter, Any, Any], Any]] = {
    "convolution.default": _dense_convolution,
    "addmm.default": _dense_mm,
    "mm.default": _dense_mm,
    "bmm.default": _dense_bmm,
}


#: sparsecc op name -> its converter: the ops a library lowers to the condensed kernels. A plug-in pattern adds its
#: own with `register_converter`; the patterns name no backend.
CONVERTERS: dict[str, Callable[[_Converter, Any, Any], Any]] = {
    patterns.fanin.LINEAR.name: fanin_linear,
    patterns.fanin.CONV2D.name: fanin_conv2d,
    patterns.nm.LINEAR.name: two_four_linear,
}


def register_converter(op: str, converter: Callable[[_Converter, Any, Any], Any]) -> None:
    """Lower ``op`` in `export_tvm` with ``converter(ctx, node, importer)`` (see `fanin_linear`)."""
    CONVERTERS[op] = converter


def converters() -> dict[str, Callable[[_Converter, Any, Any], Any]]:
    """Op (as TVM's importer names it) -> converter: the sparsecc ops' (`CONVERTERS`), and the dense ones."""
    return {**{f"{name}.default": c for name, c in CONVERTERS.items()}, **DENSE_CONVERTERS}


def unsupported_ops(program: torch.export.ExportedProgram) -> dict[str, list[str]]:
    """Every op in the (decomposed) ``program`` that neither TVM's importer nor `converters()` translates."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = set(ExportedProgramImporter().convert_map) | set(converters())
    missing: dict[str, list[str]] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", str(node.target)) not in known:
            stack = node.meta.get("nn_module_stack") or {}
            where = next(reversed(stack.values()))[0] if stack else node.name
            missing.setdefault(str(node.target), []).append(where or "<top level>")
    return missing


def _meta_function(meta: Mapping[str, Any]) -> Any:
    """A Relax function returning ``meta`` as JSON bytes: the library describes itself, no sidecar file."""
    from tvm import relax

    data = np.frombuffer(json.dumps(dict(meta)).encode(), dtype=np.uint8).copy()
    builder = relax.BlockBuilder()
    with builder.function(META_FUNCTION, params=[]):
        builder.emit_func_output(relax.const(data))
    return builder.get()[META_FUNCTION]


def _target(target: Any) -> Any:
    import tvm

    return tvm.target.Target(target) if target is not None else tvm.target.Target.from_device("cpu")


def _pipeline(target: Any) -> Any:
    """The CPU Relax pipeline with DLight's CPU rules (GEMV, reductions) for the legalised dense remainder.
    The sparsecc kernels are marked scheduled, so the rules leave them alone."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight

    @tvm.transform.module_pass(opt_level=0)
    def run(mod, _ctx):
        with target:
            return tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
                + [dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction())]
                + [p for p in cpu.dataflow_lower_passes(target) if p.info.name != "RewriteDataflowReshape"]
                + cpu.finalize_passes(target))(mod)

    return run


def check_arguments(path: Path, inputs: tuple[Tensor, ...]) -> None:
    """Refuse what `write_tvm` cannot do before anything is compiled or written."""
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    missing = tvm_runtime.unavailable()
    if missing:
        raise RuntimeUnavailableError(f"export_tvm needs TVM: {missing}")
    writable_target(path)
    if any(t.dtype != torch.float32 for t in inputs if t.is_floating_point()):
        raise InputError("export_tvm: the TVM kernels are float32; give float32 example inputs")


def write_tvm(module: nn.Module, inputs: "tuple[Tensor, ...] | Call", path: Path,
              target: Any = None) -> TvmExport:
    """Write a compiled model as a TVM shared library (see `sparsecc.export_tvm`). Its metadata names the
    inputs as the model's ``forward`` (or the keyword inputs) does, so the loaded library takes keywords."""
    import tvm
    from tvm.relax.frontend.torch import from_exported_program

    call = Call.of(inputs)
    inputs = tuple(call.tensors())
    check_arguments(path, inputs)
    try:
        program = torch.export.export(module.eval(), call.args, dict(call.kwargs)).run_decompositions()
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the message is what matters
        raise ExportError(f"torch.export could not capture the model: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]}") from exc
    refuse_missing(unsupported_ops(program), "TVM", "Replace them in the model, or export ONNX instead "
                   "(sparsecc.export_onnx)")
    target = _target(target)
    ctx = _Converter(program, target)
    table = converters()

    def convert(name: str, node: Any, importer: Any) -> Any:
        ctx.op = name.removesuffix(".default")
        return table[name](ctx, node, importer)

    mod = from_exported_program(program, run_ep_decomposition=False, custom_convert_map={
        name: (lambda node, importer, name=name: convert(name, node, importer)) for name in table})
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    outputs = [_static(v.meta["val"].shape, "output") for v in torch.utils._pytree.tree_leaves(out_node.args)]
    meta = {"format": FORMAT, "sparsecc": __version__, "tvm": tvm.__version__,
            "inputs": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in inputs],
            "names": input_names(program),
            "outputs": [list(s) for s in outputs]}
    mod[META_FUNCTION] = _meta_function(meta)
    executable = tvm.compile(mod, target=target, relax_pipeline=_pipeline(target))
    atomic_write(path, executable.export_library)
    return TvmExport(path, [tuple(t.shape) for t in inputs], outputs, ctx.kernels, meta["names"])


def load_tvm(path: "str | os.PathLike") -> Any:
    """The library written by `export_tvm` as a callable on numpy arrays or CPU tensors (numpy out)."""
    from sparsecc.core.errors import VersionError

    try:
        return _Loaded(path)
    except tvm_runner.LoadError as exc:
        raise VersionError(str(exc)) from exc


class _Loaded(tvm_runner.TvmModel):
    """`runner.TvmModel` raising sparsecc's errors."""

    def __call__(self, *inputs: Any, **named: Any) -> Any:
        try:
            return super().__call__(*inputs, **named)
        except tvm_runner.InputMismatch as exc:
            raise InputError(str(exc)) from exc
