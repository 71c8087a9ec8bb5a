"""The sparsecc operator contract, shared by every pattern's ops (`sparsecc.core.patterns`): torch.library custom ops
with fake kernels, so torch.export, torch.compile and ONNX export can trace them.

Each op takes the name of the runtime that executes it as its last argument; the real kernel is looked up in
that runtime's kernel table at call time (`kernel`), so one graph can mix runtimes and an exported graph keeps
its choice. Outputs are never views or aliases of an input (`own`): autograd forbids in-place ops on a view a
custom op returns (``ReLU(inplace=True)`` after a loaded ``.pt2``), and an alias of the bias would let callers
write into it. Each op has a backward for its input ``x`` (through the dense weight it stands for), so a call
with an input that requires grad works; the condensed constants get no gradient (training through them is not
a goal): `save_constants` is their shared ``setup_context``.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor


def kernel(runtime: str, op: str) -> Callable:
    from sparsecc.core.registry import get_runtime

    return get_runtime(runtime).kernel(op)


def own(out: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """``out`` as a tensor of its own: a view of a kernel's internal buffer is detached (same memory, no
    longer a view), an alias of an input is copied."""
    if out._is_view():
        out = out.detach()
    ptr = out.untyped_storage().data_ptr()
    if any(t is not None and t.untyped_storage().data_ptr() == ptr for t in inputs):
        out = out.clone()
    return out


def save_constants(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.constants = inputs[1:]
    ctx.x_shape = inputs[0].shape


def conv_out_size(size, kernel: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
