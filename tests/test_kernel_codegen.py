"""What the TVM kernels compile to. TVM 0.27 puts every ``scope="local"`` buffer and every TVMScript assignment
(``x = expr`` becomes a one-element local buffer) on its heap workspace (`TVMBackendAllocWorkspace`), where
LLVM cannot keep it in registers: the one-token kernels then stored their accumulators and temporaries at every
step. The kernels declare stack-sized buffers and bind values with ``T.meta_var``; this checks that no kernel
allocates workspace except where it is meant to (the 2:4 AVX kernel's permuted copy of the input)."""

import re

import pytest

from sparsecc.runtimes import unavailable
from sparsecc.runtimes.tvm import kernels as K

pytestmark = [pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}"),
              pytest.mark.slow]

TILE = K.Tile(2, 4, 32)
KEYS = [
    (K.KernelKey("gemv", 77, 1, "int16", "float32", True), set()),
    (K.KernelKey("gemv", 77, 1, "int16", "bfloat16", False, parallel=True), set()),
    (K.KernelKey("mask_gemv", 768, 1, "int32", "bfloat16", True), set()),
    (K.KernelKey("mask_gemv", 768, 1, "int32", "bfloat16", False, io="bfloat16"), set()),
    (K.KernelKey("mask_gemv", 768, 1, "int32", "float16", True, io="float16"), set()),
    (K.KernelKey("nm_gemv", 192, 1, "int16", "float32", True), set()),
    (K.KernelKey("nm_gemv_avx", 192, 1, "int16", "bfloat16", False), {"xp"}),
    (K.KernelKey("tiled", 0, 208, "int16", "float32", True, tile=TILE, lanes=16), set()),
    (K.KernelKey("tiled", 6, 64, "int16", "float32", False, tile=K.Tile(1, 4, 0), lanes=8), set()),
    (K.KernelKey("tiled", 0, 224, "int16", "bfloat16", True, tile=TILE, lanes=16, io="bfloat16"), set()),
    (K.KernelKey("tiled_flat", 0, 208, "int32", "float32", True, tile=TILE, lanes=16), set()),
    (K.KernelKey("tiled", 0, 208, "int16", "float32", True, tile=K.Tile(2, 5, 0, 1), lanes=8), set()),
    (K.KernelKey("tiled", 0, 224, "int16", "bfloat16", False, tile=K.Tile(1, 4, 0, 1), lanes=16, io="bfloat16"),
     set()),
    (K.KernelKey("spmm", 77, 197, "int16", "float32", True), set()),
    (K.KernelKey("pack", 0, 0, "int32", "float32", False, lanes=16), set()),
    (K.KernelKey("unpack", 0, 0, "int32", "float32", False, lanes=16), set()),
    (K.KernelKey("pack16", 0, 0, "int32", "float32", False, lanes=16, io="bfloat16"), set()),
    (K.KernelKey("pack16", 0, 0, "int32", "float32", False, lanes=8, io="bfloat16"), set()),
    (K.KernelKey("pack", 0, 0, "int32", "float32", False, lanes=16, io="float16"), set()),
    (K.KernelKey("unpack", 0, 0, "int32", "float32", False, lanes=16, io="bfloat16"), set()),
    (K.KernelKey("transpose", 0, 0, "int32", "float32", False), set()),
]

_WORKSPACE = re.compile(r"%([\w.]+) = tail call ptr %\w+\(i32 \d+, i32 %dev_id, i64 \d+")


def _workspace_buffers(key: K.KernelKey) -> set[str]:
    import tvm

    from sparsecc.runtimes.tvm import runtime

    executable = tvm.compile(tvm.IRModule({key.name(): K.build(key)}), target=runtime.kernel_cache().target)
    module = executable.mod.imports[0] if executable.mod.imports else executable.mod
    ir = module.inspect_source("ll")
    assert "define" in ir and key.name() in ir, "not the kernel's LLVM IR"
    return _names(ir)


def _names(ir: str) -> set[str]:
    """The workspace buffers an LLVM module allocates, by TVMScript name (LLVM's ``.i`` / number suffixes off)."""
    return {re.sub(r"\d+$", "", name.split(".")[0]) for name in _WORKSPACE.findall(ir)}


@pytest.mark.parametrize("key,allowed", KEYS, ids=[k.name() for k, _ in KEYS])
def test_kernels_keep_their_temporaries_off_the_heap_workspace(key, allowed):
    assert _workspace_buffers(key) <= allowed


def test_the_workspace_check_sees_a_local_buffer():
    """The check itself: a kernel with a ``scope="local"`` accumulator is reported."""
    import tvm
    from tvm.script import tirx as T

    from sparsecc.runtimes.tvm import runtime

    @T.prim_func
    def local(x_h: T.handle, y_h: T.handle):
        n = T.int32()
        x = T.match_buffer(x_h, (n,), "float32")
        y = T.match_buffer(y_h, (1,), "float32")
        acc = T.decl_buffer((1,), "float32", scope="local")
        acc[0] = T.float32(0)
        for i in range(n):
            acc[0] = acc[0] + x[i]
        y[0] = acc[0]

    executable = tvm.compile(tvm.IRModule({"local_acc": local.with_attr("global_symbol", "local_acc")}),
                             target=runtime.kernel_cache().target)
    module = executable.mod.imports[0] if executable.mod.imports else executable.mod
    assert _names(module.inspect_source("ll")) == {"acc"}
