"""The host CPU as the kernel and tuning caches key it: model name and the instruction-set extensions the
kernels can use. Two machines with the same TVM target string (``mcpu=rocketlake`` covers Rocket Lake and,
as detected here, Sapphire Rapids) can differ in cache sizes and in which ISA extensions they have (AMX,
AVX512_BF16); a tile or a sparse-or-dense choice measured on one is not evidence on the other, so both caches
carry this identity and re-measure when it changes.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

#: The extensions that change what the kernels compile to or how fast the dense side runs.
ISA = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
       "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8", "asimd", "sve")


@functools.cache
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, ()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("model name", "Model name") and value.strip():
            model = value.strip()
        elif name in ("flags", "Features"):
            flags.update(value.split())
        if name == "" and flags:
            break      # the first processor's block is enough
    return model, tuple(f for f in ISA if f in flags)


def model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``Intel(R) Xeon(R) Processor``."""
    return _cpuinfo()[0]


def isa() -> tuple[str, ...]:
    """The kernel-relevant ISA extensions this CPU has, in `ISA` order."""
    return _cpuinfo()[1]


def identity() -> dict:
    """What the caches key on: the model and the extensions."""
    return {"cpu": model(), "isa": " ".join(isa())}


def describe() -> str:
    """One line for benchmark output: model, extensions, logical cores."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model()} ({', '.join(isa()) or 'no vector extensions found'}; {cores} cores)"
