"""Capture: trace a model into a torch.fx graph without example inputs.

``nn.MultiheadAttention`` is traced through `attention_forward`, a traceable equivalent of its forward that
calls ``F.linear`` on ``in_proj_weight`` so its input projection shows up as a functional linear on a
parameter (which the rewrite condenses). Models that still cannot be traced (data-dependent control flow) are
handled by module swapping instead; `capture` returns the reason.
"""

from __future__ import annotations

import copy

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn


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


class Tracer(fx.Tracer):
    """fx tracer that traces through supported MultiheadAttention modules."""

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if isinstance(m, nn.MultiheadAttention) and traceable(m):
            return attention_forward(m, *args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


@dataclass(frozen=True)
class Captured:
    graph_module: Optional[fx.GraphModule]
    method: str                 # "torch.fx" or "module swapping"
    reason: str = ""            # why the graph capture failed


def _concrete_defaults(model: nn.Module, n_args: Optional[int]) -> dict[str, Any]:
    """forward() parameters the example inputs leave out, fixed to their defaults. Traced as placeholders
    they would be taken as given (``x is not None`` is True for a proxy) and bake the wrong branch in;
    fixed, fx guards them at call time."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for i, p in enumerate(params):
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        given = positional and n_args is not None and i < n_args
        if p.default is not p.empty and not given:
            concrete[p.name] = p.default
    return concrete


def capture(model: nn.Module, n_args: Optional[int] = None) -> Captured:
    """Trace ``model``; ``n_args`` is how many positional example inputs there are (None: unknown). A model
    that already is a graph (the torch.compile backend's) and cannot be traced again is used as it is."""
    try:
        graph = Tracer().trace(model, concrete_args=_concrete_defaults(model, n_args) or None)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: fall back
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if isinstance(model, fx.GraphModule):
            return Captured(copy.deepcopy(model), "torch.fx (given graph)", reason)
        return Captured(None, "module swapping", reason)
    return Captured(fx.GraphModule(model, graph, class_name=type(model).__name__), "torch.fx")
