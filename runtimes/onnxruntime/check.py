"""`check_2to4`: which weights of an ONNX file TensorRT's sparse-weight builder can use.

TensorRT reads 2:4 along the reduction (K) axis of each weight as it is stored: Conv weight ``[O, C/g, kh, kw]``
axis 1; MatMul B ``[K, N]`` axis 0; Gemm B axis 1 with ``transB=1`` (``[N, K]``), axis 0 without. K must be a
multiple of 4.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from sparsecc.core.errors import InputError

#: op type -> function(node attributes) -> (index of the weight input, its K axis)
_WEIGHT_AXIS = {
    "Conv": lambda attrs: (1, 1),
    "MatMul": lambda attrs: (1, 0),
    "Gemm": lambda attrs: (1, 1 if attrs.get("transB", 0) else 0),
}


@dataclass(frozen=True)
class TwoFour:
    node: str
    op: str
    initializer: str
    shape: tuple[int, ...]
    axis: int
    sparsity: float
    ok: bool
    reason: str             # why not, with the first offending group; "" when ok

    def __str__(self) -> str:
        verdict = "2:4" if self.ok else f"not 2:4 ({self.reason})"
        return (f"{self.node} [{self.op}] {self.initializer} {'x'.join(map(str, self.shape))} axis {self.axis}: "
                f"{self.sparsity:.0%} zeros, {verdict}")


def _first_bad_group(weight: np.ndarray, axis: int) -> Optional[str]:
    k = weight.shape[axis]
    if k % 4:
        return f"K = {k} along axis {axis} is not a multiple of 4"
    moved = np.moveaxis(weight, axis, -1)
    groups = (moved != 0).reshape(*moved.shape[:-1], k // 4, 4).sum(-1)
    bad = np.argwhere(groups > 2)
    if bad.size == 0:
        return None
    first = tuple(int(i) for i in bad[0])
    index = [*first[:-1]]
    index.insert(axis if axis >= 0 else len(index) + 1 + axis, slice(4 * first[-1], 4 * first[-1] + 4))
    where = ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else str(s) for s in index)
    return f"{len(bad)} group(s) of 4 along axis {axis} keep more than 2, first at [{where}]: {int(groups[first])} of 4"


def check_2to4(onnx_path: "str | os.PathLike") -> list[TwoFour]:
    """Every Gemm / MatMul / Conv whose weight is an initializer, and whether it is 2:4 where TensorRT reads."""
    import onnx
    from onnx import numpy_helper

    if not os.path.isfile(onnx_path):
        raise InputError(f"check_2to4: {onnx_path} is not a file")
    try:
        model = onnx.load(os.fspath(onnx_path))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have no common public type
        raise InputError(f"check_2to4: {onnx_path} is not an ONNX model ({type(exc).__name__}: {exc})") from exc
    inits = {init.name: init for init in model.graph.initializer}
    found = []
    for i, node in enumerate(model.graph.node):
        rule = _WEIGHT_AXIS.get(node.op_type)
        if rule is None:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        index, axis = rule(attrs)
        if len(node.input) <= index or node.input[index] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[index]])
        if weight.ndim < 2:
            continue
        bad = _first_bad_group(weight, axis)
        found.append(TwoFour(node.name or f"{node.op_type}_{i}", node.op_type, node.input[index], weight.shape,
                             axis, float((weight == 0).mean()), bad is None, bad or ""))
    return found
