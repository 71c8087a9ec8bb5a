"""Shared test helpers. Every numeric check goes through `assert_equivalent`: shape, then dtype, then
closeness with explicit per-dtype tolerances against the masked dense torch result."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing is downloaded: transformers reads local files only
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

#: (rtol, atol scale): atol is scale * max|expected|, as sparsecc's own validation does.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-9, 1e-9), torch.float16: (1e-2, 1e-2),
              torch.bfloat16: (2e-2, 2e-2)}


def assert_equivalent(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    rtol, scale = TOLERANCES[expected.dtype]
    atol = scale * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-6)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def small_cnn() -> torch.nn.Module:
    """conv -> BatchNorm -> ReLU -> conv -> ReLU -> pool -> Linear, 75% fan-in masks by prune hooks (seeded)."""
    from torch import nn

    from sparsecc.tooling import synthetic

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    synthetic.attach_with_prune(model, synthetic.structured_masks(model, "fanin", 0.75))
    return model


def pruned(module: torch.nn.Module, sparsity: float = 0.75) -> torch.nn.Module:
    """``module`` in eval mode with fan-in masks attached by prune hooks."""
    from sparsecc.tooling import synthetic

    module.eval()
    synthetic.attach_with_prune(module, synthetic.structured_masks(module, "fanin", sparsity))
    return module


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True)
def _give_memory_back():
    """After a test that left this worker holding several GiB (torchvision models compiled a few times over),
    free what is garbage and hand it back to the OS: two xdist workers each keeping their high-water mark
    exceeded this 24 GiB machine (the OOM killer took a worker)."""
    yield
    if sys.platform == "linux" and _resident_bytes() > 3 * 2**30:
        import ctypes
        import gc

        torch._dynamo.reset()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(autouse=True)
def _sparse_kernels(request, monkeypatch):
    """Tests of the kernels must run the kernels: the runtime's measured sparse-or-dense choice (which may pick
    the dense op on a busy machine) is pinned to sparse, the whole-model check (`autotune.never_slower`) keeps
    it, and the tile search takes the first candidate tile (a search compiles every candidate;
    `tests/test_tiles.py` runs them all), except in tests marked ``measured_choice``."""
    if request.node.get_closest_marker("measured_choice"):
        return
    from sparsecc.compiler import autotune
    from sparsecc.runtimes import tuning

    monkeypatch.setattr(autotune, "never_slower", lambda module, inputs, since=0, what="": None)

    monkeypatch.setattr(tuning, "choose", lambda cache, signature, tokens, sparse, dense, cold=False, tile="",
                        dense_form="", l2_cold=False: tuning.Choice(False, 0.0, 0.0, tokens, torch.get_num_threads(),
                                                                    cold, tile, dense_form, l2_cold))
    monkeypatch.setattr(tuning, "choose_tile", lambda cache, signature, tokens, tiles, cold=False, l2_cold=False:
                        tuning.Choice(False, 0.0, 0.0, tokens, torch.get_num_threads(), cold, next(iter(tiles)),
                                      l2_cold=l2_cold))


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache(tmp_path_factory):
    """A fresh kernel cache per test session: tests never depend on kernels a previous run left behind. The
    xdist workers of one run share it (the cache is safe across processes), so each kernel compiles once.
    ``make check`` (the inner loop) names a directory that lives across runs in ``SPARSECC_TEST_CACHE``
    instead: its entries are keyed by the kernel source, the CPU and the library versions, so an edited
    kernel compiles anew, and half of a cold run is compiling kernels."""
    persistent = os.environ.get("SPARSECC_TEST_CACHE")
    if persistent:
        cache = Path(persistent).resolve()
    else:
        base = tmp_path_factory.getbasetemp()
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        cache = root / "sparsecc-cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["SPARSECC_CACHE_DIR"] = str(cache)
