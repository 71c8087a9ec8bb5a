"""Sparse kernel or dense op: chosen by measurement, per layer shape, token-count bucket and thread count.

A condensed layer is not faster than its dense op everywhere (2:4 at 197 tokens, a small layer at every core),
and which one wins depends on the machine. The TVM runtime asks `choose` the first time a layer sees a token
bucket at a thread count; the answer is measured on that very input (sparse and dense interleaved, medians)
and kept in this process and on disk, beside the kernel cache: later compiles on the machine measure nothing.

An entry is one small JSON file named by a digest of its key (the layer's shape signature, bucket, threads,
target, library versions, kernel source), written atomically; an unreadable or foreign entry is measured
again and rewritten. ``VERSION`` changes invalidate every entry.

Layers of a model whose weights do not fit in the last-level cache are measured *cold* (`stream`): the cache
is flushed before every timed call, as the model's other layers flush it in a real call. Measured warm, a
one-token GEMV of a decoder layer finds the dense weight in cache and the dense op wins (768x2048 at 70% fan-in:
dense 120 us vs sparse 158 us), while in the running model that weight streams from memory at every token and
the sparse kernel, reading 2.2x fewer bytes, is the faster one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("sparsecc")

VERSION = 10        # 10: strided convolutions on phase planes; 9: dense forms, L2-cold decode, near-tie margins
RUNS = 7
#: Seconds one choice may spend measuring: calls shorter than a few milliseconds get more rounds than `RUNS`
#: (a one-token layer up to 60), long ones keep the minimum, so compile time stays bounded.
BUDGET_S = 0.02
#: Calls of up to this many tokens are decode-sized: measured with L2 flushed where the model exceeds it
#: (`beyond_l2`), near-ties to the sparse kernel (`DENSE_MARGIN`), and the dense op in torch's own form
#: (`sparsecc.runtimes.dense`).
DECODE_TOKENS = 4
#: A measured winner must win by this much, else the call runs what wins near-ties in a model, which one
#: layer's measurement cannot see. Decode-sized calls (up to `DECODE_TOKENS` tokens): the sparse kernel, whose
#: smaller tensors leave the cache to the rest of the model (a bf16 decoder at 2:4 whose k/v projections
#: measured 147 us dense vs 149 us sparse decoded at 1.23-1.26x dense with them dense, 1.33-1.36x sparse).
DENSE_MARGIN = 0.05
#: Many-token calls: the dense op (no pack and unpack around it, torch's own threads). all-MiniLM-L6-v2 at 2:4
#: in fp32, whose 6-12 sparse choices measured 1-7.5% faster than dense alone, ran 0.86-0.95x dense with them,
#: 0.96-0.98x with those layers dense (16 and 128 tokens, 1 and 2 threads, same process, interleaved).
SPARSE_MARGIN = 0.10


@dataclass(frozen=True)
class Choice:
    """What ran faster for one layer at one token bucket and thread count, and the two medians."""

    dense: bool
    sparse_s: float
    dense_s: float
    tokens: int
    threads: int
    cold: bool = False          # measured with the last-level cache flushed before each call
    tile: str = ""              # the sparse kernel's register tile (`kernels.Tile.name`), "" if it has none
    dense_form: str = ""        # the dense op's form (`sparsecc.runtimes.dense`), "" where it has one form
    l2_cold: bool = False       # measured with L2 flushed before each call (`beyond_l2`)
    whole_model: bool = False   # dense although the layer's sparse kernel won: the model ran faster all dense

    def describe(self) -> str:
        path = "dense op (whole model faster dense)" if self.whole_model else "dense op" if self.dense \
            else "sparse kernel"
        tile = f" (tile {self.tile})" if self.tile else ""
        form = f" ({self.dense_form})" if self.dense_form else ""
        flushed = ", cold cache" if self.cold else ", L2 flushed" if self.l2_cold else ""
        return (f"{path} at {self.tokens} token(s), {self.threads} thread(s){flushed}: "
                f"sparse{tile} {self.sparse_s * 1e6:,.0f} us vs dense{form} {self.dense_s * 1e6:,.0f} us")


_routes_made = 0


def routes_made() -> int:
    """How many (layer, bucket) routes this process has settled so far: a call that moved it made choices, which
    `sparsecc.compiler.autotune.never_slower` then checks on the whole model (``since``)."""
    return _routes_made


def route_made() -> int:
    """Count one more settled route; its number."""
    global _routes_made
    _routes_made += 1
    return _routes_made


def bucket(tokens: int) -> int:
    """Token counts that share a choice: exact up to 4, then powers of two (197 and 256 share one)."""
    return tokens if tokens <= 4 else 1 << (tokens - 1).bit_length()


class TuningCache:
    """Choices by key: in memory for this process, one JSON file per entry on disk across processes."""

    def __init__(self, fingerprint: dict, directory: Path) -> None:
        self.fingerprint = {"version": VERSION, **fingerprint}
        self.directory = directory
        self._memory: dict[str, Choice] = {}
        self.stats = {"memory": 0, "disk": 0, "measured": 0}

    def _path(self, key: dict) -> tuple[str, Path]:
        text = json.dumps({**self.fingerprint, **key}, sort_keys=True)
        return text, self.directory / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"

    def get(self, key: dict) -> Optional[Choice]:
        text, path = self._path(key)
        found = self._memory.get(text)
        if found is not None:
            self.stats["memory"] += 1
            return found
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            if entry.get("key") != text:
                raise ValueError("entry is for another key")
            found = Choice(**entry["choice"])
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is measured again
            log.warning("sparsecc tuning cache: measuring again (%s: %s in %s)", type(exc).__name__, exc, path.name)
            return None
        self._memory[text] = found
        self.stats["disk"] += 1
        return found

    def put(self, key: dict, choice: Choice) -> None:
        from sparsecc.core.files import atomic_write

        text, path = self._path(key)
        self._memory[text] = choice
        self.stats["measured"] += 1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"key": text, "choice": asdict(choice)})))
        except OSError as exc:     # a read-only cache still tunes this process
            log.warning("sparsecc tuning cache: not written (%s)", exc)


@functools.cache
def _cache_sizes() -> dict[int, int]:
    """Bytes per cache level of CPU 0 (Linux sysfs; data and unified caches), empty where it cannot be read.
    Read once: the flushes ask for it before every timed call."""
    sizes: dict[int, int] = {}
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (entry / "type").read_text().strip() == "Instruction":
                continue
            level, text = int((entry / "level").read_text()), (entry / "size").read_text().strip()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes[level] = max(sizes.get(level, 0), int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return sizes


def llc_bytes() -> int:
    """The largest cache level's size, 32 MiB where it cannot be read."""
    return max(_cache_sizes().values(), default=32 * 2**20)


def l2_bytes() -> int:
    """One core's L2 size, 1 MiB where it cannot be read."""
    return _cache_sizes().get(2, 2**20)


@functools.lru_cache(maxsize=4)
def _flush_buffer(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes // 4)


def _flush() -> None:
    """Evict the last-level cache by *reading* twice its size (written, the dirty lines' write-backs would be
    charged to the timed call: a 768x768 GEMM at 32 tokens measured 1.7x its cold time)."""
    _flush_buffer(2 * llc_bytes()).sum()


def _flush_l2() -> None:
    """Evict the L2 of every core the call runs on (twice its size per thread, read by torch's threads)."""
    _flush_buffer(2 * l2_bytes() * torch.get_num_threads()).sum()


def _before(cold: bool, l2_cold: bool) -> Optional[Callable[[], None]]:
    return _flush if cold else _flush_l2 if l2_cold else None


def _key(signature: tuple, tokens: int, cold: bool, **extra) -> dict:
    return {"signature": [str(s) for s in signature], "bucket": bucket(tokens), "threads": torch.get_num_threads(),
            "cold": cold, **extra}


def choose(cache: TuningCache, signature: tuple, tokens: int, sparse: Callable[[], Any],
           dense: Callable[[], Any], cold: bool = False, tile: str = "", dense_form: str = "",
           l2_cold: bool = False) -> Choice:
    """The cached choice for this layer shape, token bucket and thread count, or one measured now (``cold``:
    with the last-level cache flushed before each call; ``l2_cold``: L2). ``tile`` names the sparse kernel's
    tile and ``dense_form`` the dense op's form (both part of the key)."""
    key = _key(signature, tokens, cold, tile=tile, **({"dense_form": dense_form} if dense_form else {}),
               **({"l2_cold": True} if l2_cold else {}))
    found = cache.get(key)
    if found is not None:
        return found
    from sparsecc.core import timing

    fns = {"sparse": sparse, "dense": dense}
    times = timing.medians(fns, runs=RUNS, warmup=1, before=_before(cold, l2_cold), budget_s=BUDGET_S)
    dense_wins = times["sparse"] > times["dense"] * (1 + DENSE_MARGIN) if tokens <= DECODE_TOKENS else \
        times["sparse"] * (1 + SPARSE_MARGIN) > times["dense"]
    choice = Choice(dense_wins, times["sparse"], times["dense"], tokens,
                    torch.get_num_threads(), cold, tile, dense_form, l2_cold and not cold)
    cache.put(key, choice)
    return choice


#: Interleaved rounds per candidate tile: a tile search runs at first use of a layer shape and token bucket.
TILE_RUNS = 5


def choose_tile(cache: TuningCache, signature: tuple, tokens: int, tiles: dict[str, Callable[[], Any]],
                cold: bool = False, l2_cold: bool = False) -> Choice:
    """The fastest of named candidates (the sparse kernel's register tiles, the dense op's forms) for this layer
    shape, token bucket and thread count: cached, or measured now (interleaved medians). The choice's ``tile``
    is the winner's name, ``sparse_s`` its time, ``dense_s`` the slowest candidate's (the spread the search
    bought)."""
    key = _key(signature, tokens, cold, tiles=sorted(tiles), **({"l2_cold": True} if l2_cold else {}))
    found = cache.get(key)
    if found is not None:
        return found
    from sparsecc.core import timing

    times = timing.medians(tiles, runs=TILE_RUNS, warmup=1, before=_before(cold, l2_cold), budget_s=BUDGET_S)
    best = min(times, key=times.get)
    choice = Choice(False, times[best], max(times.values()), tokens, torch.get_num_threads(), cold, best,
                    l2_cold=l2_cold and not cold)
    cache.put(key, choice)
    return choice


def stream(values: torch.Tensor) -> None:
    """This layer's model does not fit in the last-level cache: measure its choices cold."""
    values.__dict__["_sparsecc_cold"] = True


def streaming(values: torch.Tensor) -> bool:
    return values.__dict__.get("_sparsecc_cold", False)


def beyond_l2(values: torch.Tensor) -> None:
    """This layer's model does not fit in one core's L2: between two calls of the layer the others' tensors
    pass through L2, so decode-sized calls are measured with it flushed. Measured warm, a one-token dense
    GEMV finds its weight in L2 and beat the sparse kernel that wins in the model (a bf16 decoder at 50%:
    48 of 84 layers chose dense warm, decode 1.00x dense at 2 threads)."""
    values.__dict__["_sparsecc_l2_cold"] = True


def l2_cold(values: torch.Tensor, tokens: int) -> bool:
    """Whether a call of ``tokens`` tokens on this layer is measured with L2 flushed (not when it is measured
    cold already)."""
    return tokens <= DECODE_TOKENS and values.__dict__.get("_sparsecc_l2_cold", False) and not streaming(values)


def disable(values: torch.Tensor) -> None:
    """Run this layer's sparse kernel at every token count (``compile(..., autotune=False)``)."""
    values.__dict__["_sparsecc_untuned"] = True


def enabled(values: torch.Tensor) -> bool:
    return not values.__dict__.get("_sparsecc_untuned", False)
