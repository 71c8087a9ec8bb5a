"""Capture: trace a model into a torch.fx graph without example inputs.

``nn.MultiheadAttention`` is traced through `attention_forward`, a traceable equivalent of its forward that
calls ``F.linear`` on ``in_proj_weight`` so its input projection shows up as a functional linear on a
parameter (which the rewrite condenses). ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are
traced through their eval-mode math without the fused fast path, which would read the dense weights of
their Linears (`encoder_layer_forward`, `encoder_forward`); ``nn.TransformerDecoder`` and ``nn.Transformer``
without their input checks, which tracing cannot evaluate. Models that still cannot be traced
(data-dependent control flow) are handled by module swapping instead; `capture` returns the reason.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from sparsecc.core.inputs import Call


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def attention_mask(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                   is_causal: bool) -> Optional[Tensor]:
    """One additive mask broadcastable to ``[N, H, L, S]`` from MultiheadAttention's mask arguments.

    Wrapped as an fx leaf: its branches depend on which masks are given and their dtypes, which tracing
    cannot see, so it runs eagerly at call time."""
    h = q.shape[1]
    mask = _additive(attn_mask, q.dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.unflatten(0, (-1, h))
    padding = _additive(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding[:, None, None, :]
        mask = padding if mask is None else mask + padding
    if mask is None and is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        mask = _additive(causal, q.dtype)
    return mask


def add_mask(scores: Tensor, mask: Optional[Tensor]) -> Tensor:
    return scores if mask is None else scores + mask


fx.wrap("attention_mask")
fx.wrap("add_mask")


def traceable(mha: nn.MultiheadAttention) -> bool:
    """Configurations `attention_forward` reproduces exactly."""
    return mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn


def attention_forward(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                      key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                      attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                      is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Eval-mode ``nn.MultiheadAttention.forward`` for batched inputs, written with traceable ops."""
    torch._assert(query.dim() == 3, "sparsecc traces MultiheadAttention for batched (3-D) inputs only")
    self_attention = query is key and key is value
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, h = mha.embed_dim, mha.num_heads
    if self_attention:
        q, k, v = F.linear(query, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    else:
        w, b = mha.in_proj_weight, mha.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        q, k, v = F.linear(query, w[:e], bq), F.linear(key, w[e:2 * e], bk), F.linear(value, w[2 * e:], bv)
    q, k, v = (t.unflatten(-1, (h, e // h)).transpose(1, 2) for t in (q, k, v))   # [N, H, L, D]
    mask = attention_mask(q, k, attn_mask, key_padding_mask, is_causal)
    if need_weights:
        weights = add_mask(q @ k.transpose(-2, -1) / math.sqrt(e // h), mask).softmax(dim=-1)
        out = weights @ v
        weights = weights.mean(dim=1) if average_attn_weights else weights
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        weights = None
    out = mha.out_proj(out.transpose(1, 2).flatten(-2))
    if not mha.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _attend(attn: nn.MultiheadAttention, x: Tensor, kv: Tensor, mask: Optional[Tensor],
            padding: Optional[Tensor], causal: bool, dropout: nn.Module) -> Tensor:
    return dropout(attn(x, kv, kv, attn_mask=mask, key_padding_mask=padding, need_weights=False,
                        is_causal=causal)[0])


def _feed_forward(layer: nn.Module, x: Tensor, dropout: nn.Module) -> Tensor:
    return dropout(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))


def _residual(x: Tensor, norm_first: bool, blocks: list[tuple[nn.Module, Callable[[Tensor], Tensor]]]) -> Tensor:
    """The transformer layers' residual blocks: ``x + block(norm(x))`` (pre-norm) or ``norm(x + block(x))``."""
    for norm, block in blocks:
        x = x + block(norm(x)) if norm_first else norm(x + block(x))
    return x


def encoder_layer_forward(layer: nn.TransformerEncoderLayer, src: Tensor, src_mask: Optional[Tensor] = None,
                          src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """Eval-mode ``nn.TransformerEncoderLayer.forward`` on its slow path: the same math through its submodules
    (its fused fast path would run the dense weights of its Linears)."""
    return _residual(src, layer.norm_first, [
        (layer.norm1, lambda x: _attend(layer.self_attn, x, x, src_mask, src_key_padding_mask, is_causal,
                                        layer.dropout1)),
        (layer.norm2, lambda x: _feed_forward(layer, x, layer.dropout2)),
    ])


def zero_padding_like_nested(out: Tensor, src: Tensor, key_padding_mask: Optional[Tensor], mask: Optional[Tensor],
                             use_nested: bool, mask_check: bool) -> Tensor:
    """``nn.TransformerEncoder`` runs eval no-grad calls with a key padding mask on nested tensors and returns
    zeros at the padded positions; the slow path does not. Zero them where the user's encoder would have (the
    conditions it checks at call time, so this runs eagerly: an fx leaf)."""
    if (not use_nested or key_padding_mask is None or mask is not None or src.dim() != 3 or torch.is_grad_enabled()
            or not torch.backends.mha.get_fastpath_enabled() or torch.is_autocast_enabled()):
        return out
    keep = key_padding_mask.logical_not()
    if mask_check and not torch._nested_tensor_from_mask_left_aligned(src, keep):
        return out
    return out.masked_fill(~keep[..., None], 0.0)


fx.wrap("zero_padding_like_nested")


def encoder_forward(encoder: nn.TransformerEncoder, src: Tensor, mask: Optional[Tensor] = None,
                    src_key_padding_mask: Optional[Tensor] = None, is_causal: Optional[bool] = None) -> Tensor:
    """Eval-mode ``nn.TransformerEncoder.forward``: its layers on the slow path, then what its nested-tensor
    path does to padded positions."""
    out = src
    for layer in encoder.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    out = zero_padding_like_nested(out, src, src_key_padding_mask, mask, getattr(encoder, "use_nested_tensor", False),
                                   getattr(encoder, "mask_check", True))
    return out if encoder.norm is None else encoder.norm(out)


def decoder_layer_forward(layer: nn.TransformerDecoderLayer, tgt: Tensor, memory: Tensor,
                          tgt_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                          tgt_key_padding_mask: Optional[Tensor] = None,
                          memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                          memory_is_causal: bool = False) -> Tensor:
    """``nn.TransformerDecoderLayer.forward`` through its submodules (fx would keep a torch.nn module whole)."""
    return _residual(tgt, layer.norm_first, [
        (layer.norm1, lambda x: _attend(layer.self_attn, x, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal,
                                        layer.dropout1)),
        (layer.norm2, lambda x: _attend(layer.multihead_attn, x, memory, memory_mask, memory_key_padding_mask,
                                        memory_is_causal, layer.dropout2)),
        (layer.norm3, lambda x: _feed_forward(layer, x, layer.dropout3)),
    ])


def decoder_forward(decoder: nn.TransformerDecoder, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                    memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                    memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                    memory_is_causal: bool = False) -> Tensor:
    """``nn.TransformerDecoder.forward`` without its checks on the input (nested tensors, causal-mask
    detection: a given mask is used as is, which is what a causal hint stands for)."""
    out = tgt
    for layer in decoder.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return out if decoder.norm is None else decoder.norm(out)


def transformer_forward(model: nn.Transformer, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None,
                        tgt_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                        src_key_padding_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                        memory_key_padding_mask: Optional[Tensor] = None, src_is_causal: Optional[bool] = None,
                        tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False) -> Tensor:
    """``nn.Transformer.forward`` without its shape checks (which only raise): encoder, then decoder."""
    memory = model.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return model.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def _encoder_layer_traceable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.TransformerEncoderLayer) and traceable(layer.self_attn)


def _decoder_layer_traceable(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.TransformerDecoderLayer) and traceable(layer.self_attn)
            and traceable(layer.multihead_attn))


def _decoder_traceable(decoder: nn.Module) -> bool:
    return isinstance(decoder, nn.TransformerDecoder) and all(map(_decoder_layer_traceable, decoder.layers))


#: Modules traced through a traceable equivalent of their forward: (applies to, equivalent).
EQUIVALENTS: tuple[tuple[Callable[[nn.Module], bool], Callable[..., Any]], ...] = (
    (lambda m: isinstance(m, nn.MultiheadAttention) and traceable(m), attention_forward),
    (_encoder_layer_traceable, encoder_layer_forward),
    (lambda m: isinstance(m, nn.TransformerEncoder) and all(map(_encoder_layer_traceable, m.layers)),
     encoder_forward),
    (_decoder_layer_traceable, decoder_layer_forward),
    (_decoder_traceable, decoder_forward),
    (lambda m: isinstance(m, nn.Transformer) and _decoder_traceable(m.decoder), transformer_forward),
)


def _equivalent(m: nn.Module) -> Optional[Callable[..., Any]]:
    return next((equivalent for applies, equivalent in EQUIVALENTS if applies(m)), None)


class Tracer(fx.Tracer):
    """fx tracer that traces through the modules of `EQUIVALENTS`, the root included."""

    def trace(self, root: Any, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
        equivalent = _equivalent(root) if isinstance(root, nn.Module) else None
        if equivalent is None:
            return super().trace(root, concrete_args)
        cls = type(root)     # fx traces type(root).forward: trace a subclass whose forward is the equivalent
        root.__class__ = type(cls.__name__, (cls,), {"forward": equivalent})
        try:
            return super().trace(root, concrete_args)
        finally:
            root.__class__ = cls

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        equivalent = _equivalent(m)
        if equivalent is not None:
            return equivalent(m, *args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


@dataclass(frozen=True)
class Captured:
    graph_module: Optional[fx.GraphModule]
    method: str                 # "torch.fx" or "module swapping"
    reason: str = ""            # why the graph capture failed


def concrete_defaults(model: nn.Module, example: Optional[Call]) -> dict[str, Any]:
    """forward() parameters the example call leaves out, fixed to their defaults. Traced as placeholders
    they would be taken as given (``x is not None`` is True for a proxy) and bake the wrong branch in;
    fixed, fx guards them at call time. ``example`` None: which are given is unknown."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for i, p in enumerate(params):
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        given = example is None and positional or example is not None and (
            positional and i < len(example.args) or p.name in example.kwargs)
        if p.default is not p.empty and not given:
            concrete[p.name] = p.default
    return concrete


def dynamic_shapes(model: nn.Module, example: Call) -> dict[str, Any]:
    """Every dimension of every tensor input free (``Dim.AUTO``: export keeps those the model specialises),
    keyed by forward()'s parameter names as torch.export wants when there are keyword inputs."""
    bound = inspect.signature(model.forward).bind(*example.args, **example.kwargs)
    auto = torch.export.Dim.AUTO

    def spec(value: Any) -> Any:
        return {i: auto for i in range(value.dim())} if isinstance(value, Tensor) else None
    return {name: torch.utils._pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def export_graph(model: nn.Module, example: Call) -> fx.GraphModule:
    """The graph ``torch.export`` (non-strict: the model's Python runs as is) records for calls like
    ``example``, with its layers as modules again (`sparsecc.capture.modularize`) at the model's own paths."""
    from sparsecc.capture.modularize import modularize

    quiet = logging.getLogger("torch._export.non_strict_utils")    # "dimension ... specialized" per input
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        program = torch.export.export(model, example.args, dict(example.kwargs),
                                      dynamic_shapes=dynamic_shapes(model, example), strict=False)
    finally:
        quiet.setLevel(level)
    gm = program.module()
    modularize(gm)
    return gm


def exported_graph(model: nn.Module, example: Call) -> tuple[Optional[fx.GraphModule], str]:
    """`export_graph` for graph passes on a model torch.fx cannot trace, or why there is none. A model that takes
    ``use_cache`` is exported without its cache (the same layers; a cache object is no pytree output)."""
    if not example or isinstance(model, fx.GraphModule):     # a graph already (torch.compile's): nothing to add
        return None, ""
    if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in example.kwargs:
        example = Call(example.args, {**example.kwargs, "use_cache": False})
    try:
        return export_graph(model, example), ""
    except Exception as exc:  # noqa: BLE001 - not exportable either: the reason goes in the report
        return None, f"; nor by torch.export ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"


def capture(model: nn.Module, example: Optional[Call] = None) -> Captured:
    """Trace ``model`` for calls like ``example`` (None: unknown). A model that already is a graph (the
    torch.compile backend's) and cannot be traced again is used as it is."""
    try:
        graph = Tracer().trace(model, concrete_args=concrete_defaults(model, example) or None)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: fall back
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if isinstance(model, fx.GraphModule):
            return Captured(copy.deepcopy(model), "torch.fx (given graph)", reason)
        return Captured(None, "module swapping", reason)
    return Captured(fx.GraphModule(model, graph, class_name=type(model).__name__), "torch.fx")
