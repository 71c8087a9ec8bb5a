"""A residual add written into the output of the condensed layer before it, where nothing else can see that
output: ``layer(x) + skip`` as ``layer(x).add_(skip)``.

The sum is a fresh tensor as large as the layer's output, and a fresh tensor of megabytes costs a page fault
per 4 KiB on every call (its memory goes back to the system when freed): the 16 residual adds of a ResNet-50
took 4.4 ms of its 40 ms at one thread out of place, measured in the same process. The graph pass
(`sparsecc.passes.inplace`) rewrites an add whose operand is a condensed layer's output with no other user;
`add_into` then checks at each call that writing into that output changes nothing anyone can observe, and
adds out of place otherwise:

- it is a plain tensor of its own: not a view (a layer whose rows are all ablated could answer with one), no
  other tensor on its memory, no Python reference but the graph's (a forward hook that kept the layer's
  output keeps it as it was);
- the sum has its shape and dtype (no broadcasting into it, no type promotion);
- no autograd graph records it, and no tracer is looking (torch.export, dynamo: they get the plain add).

Values are the same either way: IEEE addition is commutative, and the add runs on the same two tensors.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

#: References to the layer's output while `add_into` runs: the graph's local variable, the argument, and
#: `sys.getrefcount`'s own.
_GRAPH_REFERENCES = 3
#: `torch._C._storage_Use_Count` on a tensor that alone holds its memory: the tensor, and the storage object
#: asked.
_SOLE_STORAGE = 2


def _sole_owner(t: Tensor) -> bool:
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:                          # a torch without it: assume shared
        return False
    return count(t.untyped_storage()._cdata) <= _SOLE_STORAGE


def add_into(fresh: Tensor, other: Tensor) -> Tensor:
    """``fresh + other``, written into ``fresh`` where that is unobservable (see the module docstring)."""
    if type(fresh) is Tensor and type(other) is Tensor and fresh._base is None \
            and not (torch.is_grad_enabled() and (fresh.requires_grad or other.requires_grad)) \
            and not torch.compiler.is_compiling() and fresh.device == other.device \
            and sys.getrefcount(fresh) <= _GRAPH_REFERENCES and _sole_owner(fresh) \
            and fresh.dtype == torch.result_type(fresh, other) \
            and torch.broadcast_shapes(fresh.shape, other.shape) == fresh.shape:
        return fresh.add_(other)
    return fresh + other
