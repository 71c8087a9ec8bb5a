"""Parallel kernel calls on PyTorch's own intra-op threads.

Every TVM kernel takes a block range ``[b0, b1)`` (rows, row pairs or transpose blocks) just before its
output, the last argument. `run` splits the blocks over ``torch.get_num_threads()`` threads through a small C launcher
(`parallel.c`) that opens an OpenMP region in the libgomp torch itself loaded: the threads that run torch's
dense ops run the sparse kernels too. A second pool (TVM's) measured 2.2x slower per call pair next to torch,
each pool's idle workers spinning on the cores the other needed (``../shared/DESIGN.md``, "Threads").

The launcher is compiled once per machine with the C compiler TVM already needs for its kernels, and cached
beside them. Without a compiler, or with a torch that is not built on libgomp, kernels run on the calling
thread and `unavailable()` says why.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("sparsecc")

SOURCE = Path(__file__).with_name("parallel.c")
#: Multiply-adds below which a thread's share costs less than waking it (about torch's own grain size).
GRAIN = 32768


def _libgomp() -> Optional[Path]:
    """The OpenMP runtime torch is built on, if it is libgomp (the launcher must share its thread pool)."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    if found:
        return found[0]
    import re

    for line in Path("/proc/self/maps").read_text().splitlines():
        match = re.search(r"(/\S*libgomp\S*\.so\S*)$", line)
        if match:
            return Path(match.group(1))
    return None


def _build(target: Path) -> None:
    import tvm_ffi.libinfo as info

    gomp = _libgomp()
    if gomp is None:
        raise RuntimeError("torch is not built on libgomp (no libgomp loaded)")
    include = info.find_include_path()
    ffi_lib = Path(info.find_libtvm_ffi())
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "parallel.o"
        so = Path(tmp) / "parallel.so"
        for cmd in (["cc", "-O2", "-fPIC", "-fopenmp", f"-I{include}", f"-I{info.find_dlpack_include_path()}",
                     "-c", str(SOURCE), "-o", str(obj)],
                    ["cc", "-shared", str(obj), str(gomp), str(ffi_lib), f"-Wl,-rpath,{ffi_lib.parent}",
                     "-o", str(so)]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:2])}... failed: {done.stderr.strip()[-500:]}")
        from sparsecc.core.files import atomic_write

        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp_path: Path(tmp_path).write_bytes(so.read_bytes()))


@functools.cache
def _launcher() -> tuple[Optional[Callable], Optional[str]]:
    try:
        import tvm_ffi

        from sparsecc.core.files import cache_root
        from sparsecc.runtimes.tvm.cache import _version

        digest = hashlib.sha256(SOURCE.read_bytes())
        digest.update(f"{torch.__version__} {_version('apache-tvm-ffi')}".encode())
        so = cache_root() / "kernels" / f"parallel-{digest.hexdigest()[:16]}.so"
        if not so.exists():
            _build(so)
        module = tvm_ffi.load_module(str(so))
        return module.get_function("sparsecc_parallel"), None
    except Exception as exc:  # noqa: BLE001 - any failure means kernels run on the calling thread
        reason = f"parallel kernel launcher unavailable ({type(exc).__name__}: {exc}); kernels run on one thread"
        log.warning("sparsecc: %s", reason)
        return None, reason


def unavailable() -> Optional[str]:
    return _launcher()[1]


def threads(blocks: int, work: int) -> int:
    """How many of torch's threads a call with ``blocks`` blocks and ``work`` multiply-adds gets."""
    return max(1, min(torch.get_num_threads(), blocks, work // GRAIN))


def run(kernel: Callable, blocks: int, work: int, *args: Any) -> None:
    """``kernel(*inputs, b0, b1, output)`` over ``[0, blocks)`` for ``args = (*inputs, output)``, split over
    torch's threads when the work pays for it."""
    n = threads(blocks, work)
    if n > 1:
        launch = _launcher()[0]
        if launch is not None:
            launch(kernel, n, blocks, *args)
            return
    kernel(*args[:-1], 0, blocks, args[-1])
