"""TensorIR kernels for the TVM runtime, written in TVMScript and specialised on what shapes the code:
the fan-in ``k``, the token count and the index dtype. Row counts and feature sizes stay symbolic, so one
compiled kernel serves every layer with the same ``k``.

Buffers are declared with element alignment: kernels never assume 64-byte aligned data, so a misaligned view
cannot make them fault. They have no element offset (torch hands over a view as a pointer to its first
element): a symbolic offset cost one integer add per gathered input.

- `fanin_gemv` — few tokens: each live row accumulates 8 products at a time (values and indices contiguous,
  inputs gathered), then reduces horizontally. Best when there is no token dimension to vectorise over.
- `nm_gemv_avx` / `nm_gemv` — 2:4 for few tokens, reading the 2-bit metadata directly (x86 AVX permutes, or
  portable vector selects).
- `fanin_spmm` — many tokens (ViT's 197, a convolution's H*W pixels): inputs transposed to ``[in, tokens]`` so
  each index selects a contiguous row; 4 rows x 16 tokens of accumulators stay in registers while the
  fan-in streams by. The output is ``[out, tokens]``: NCHW for a convolution; a Linear transposes it back
  (cheaper than strided stores from the kernel). ``spmm_flat`` reads ``X[off[r, j] + t]`` from a flat input
  instead: a stride-1 convolution whose taps are offsets into the zero-padded input plane, computed over the
  padded width so that an output row tile is contiguous in the input (no im2col columns).
Ablated rows are never computed: live row ``r`` writes output row ``orow[r]``, ablated rows get their bias.

- `fanin_tiled` — the many-token kernel of the eager runtime, its register tile a parameter (`Tile`: rows x
  token vectors, and the K chunk) chosen per machine by measurement (`runtimes/tuning.py`), its vectors as wide
  as the CPU's (`lanes`). Tokens are padded to a whole number of vectors (``[in, tokens_padded]``): every tile
  is a multiple of the vector width, so LLVM keeps all of it in registers (odd remainders spilled).
- `transpose` — the token kernel's layout change for a Linear (``[tokens, in]`` in, ``[out, tokens]`` out):
  8x8 blocks transposed in registers, 2.5-3.3x faster than torch's strided copy (4-8 GB/s here);
  `pack` / `unpack` do the same into and out of the tiled kernel's padded token layout (token blocks outer:
  on the Xeon 1.1-1.7x faster than the other order, and no scalar edge for the token remainder).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import tvm
from tvm.script import tirx as T

VEC = 8            # fp32 lanes of one AVX2 register; LLVM splits or widens for other targets
ROWS = 2           # rows per register block in the token kernel
TOKENS = 32        # tokens per register block in the token kernel (2x32 measured fastest of 4x16, 1x64, ...)
CHAINS = 4         # independent accumulators in the one-token kernels
CHUNK = 32         # values per K chunk of the K-blocked token kernel (its gathered inputs stay in L1)
PARTS = 16         # shares of a parallel kernel's block range on TVM's pool (a few per thread: load balance)
STATIC_K = 64      # fan-ins up to this are compiled into the tiled kernel (fully unrolled); larger ones are not


@dataclass(frozen=True)
class Tile:
    """The register tile of the tiled token kernel: ``rows`` output rows x ``vectors`` token vectors of
    accumulators, the fan-in swept ``chunk`` values at a time for every row of the thread's share before the
    next chunk (the inputs a chunk gathers stay in L1; partial sums wait in the output), 0: the whole fan-in."""

    rows: int
    vectors: int
    chunk: int
    #: Nonzero: the fan-in is swept by input window instead of ``chunk`` values, each window about ``window``
    #: KiB of the token tile's inputs (`windows`), the same window for every row: a row's values in it are a
    #: run of its own length, read from the layer's window table. 0: by ``chunk``.
    window: int = 0

    def name(self) -> str:
        return f"r{self.rows}v{self.vectors}" + (f"w{self.window}" if self.window else f"c{self.chunk}")

    @classmethod
    def parse(cls, text: str) -> "Tile":
        import re

        found = re.fullmatch(r"r(\d+)v(\d+)([cw])(\d+)", text)
        if found is None:
            raise ValueError(f"not a tile name: {text!r}")
        rows, vectors, kind, size = found.groups()
        return cls(int(rows), int(vectors), int(size) if kind == "c" else 0, int(size) if kind == "w" else 0)

    def code(self) -> "Tile":
        """The tile as its compiled kernel depends on it: the window's size lives in the window table only."""
        return Tile(self.rows, self.vectors, 0, 1) if self.window else self


#: The tiles the tuner measures, best-known first. Measured on a Xeon (AVX-512, 1 thread, a 768x768 Linear at
#: 64 of 768 inputs, 208 padded tokens): 71-83 GFLOP/s on the nonzeros among these with random indices, 87-120
#: with every row reading the same inputs (no cache misses: the instruction stream's own bound).
#: The windowed ones (`Tile.window`) keep a window of the input in L2 where the whole of it does not fit (Zen 3,
#: 512 KiB L2, 1 thread, fc2 3072 -> 768 at 90% and 197 tokens: 9-10% faster than the best of the others).
TILES = (Tile(2, 4, 32), Tile(2, 4, 16), Tile(3, 3, 32), Tile(2, 5, 16), Tile(1, 8, 32), Tile(4, 2, 32),
         Tile(2, 6, 16), Tile(1, 4, 32), Tile(1, 7, 0, 128), Tile(2, 5, 0, 128))


def candidates(k: int, tokens: int, width: int, pairs: bool = False) -> tuple[Tile, ...]:
    """The distinct tiles of `TILES` for fan-in ``k`` and ``tokens`` (padded) tokens of ``width`` lanes: a chunk
    of the whole fan-in or more is no chunk, and tiles that cut the tokens alike (`token_tiles`) are one.
    ``pairs``: the kernel reads token vectors two at a time (a bf16 input, `SPLIT_DTYPE`), so a tile's vectors
    are an even number (odd ones round down, to 2 at least)."""
    step = 2 if pairs else 1
    seen: dict[tuple, Tile] = {}
    for tile in TILES:
        if tile.window and k <= STATIC_K:      # a few values a row, compiled in: no windows to sweep
            continue
        chunk = tile.chunk if 0 < tile.chunk < k else 0
        runs = token_tiles(tokens, width * step, max(1, tile.vectors // step))
        vectors = max(w for w, _, _ in runs) * step
        seen.setdefault((tile.rows, tuple(runs), chunk, tile.window), Tile(tile.rows, vectors, chunk, tile.window))
    return tuple(seen.values())


def lanes(target) -> int:
    """fp32 lanes of the widest vector register the target has (its kernels' token vectors)."""
    from tvm.target import codegen

    return 16 if codegen.target_has_features("avx512f", target) else 8


def padded(tokens: int, width: int) -> int:
    """``tokens`` rounded up to a whole number of ``width``-lane vectors."""
    return -(-tokens // width) * width


#: The many-token input layout of a bf16 input (`pack16`, `fanin_tiled`): two tokens per 32-bit word, ``2 *
#: lanes`` tokens per row of words, word ``i`` holding token ``i`` (low half) and token ``i + lanes`` (high
#: half), so one 64-byte load gives two float32 vectors in token order by a shift and a mask (a bf16 is the
#: upper half of its float32). An fp16 input is widened by the float32 `pack` instead: F16C's conversion per
#: vector in the tiled kernel competes with its multiply-adds for the same ports (measured on ViT-B/16's
#: Linears at 197 tokens: 0.92-1.00x the float32 kernel).
SPLIT_DTYPE = "bfloat16"


def _wide(value, dtype: str, lanes: int = 1):
    """``value`` (a load from a values buffer of ``dtype``) as float32: the kernels keep values in the model's
    dtype (bf16 / fp16 halve the bytes a one-token call streams) and compute in float32."""
    if dtype == "float32":
        return value
    return T.Cast("float32" if lanes == 1 else f"float32x{lanes}", value)


def _gathered(lanes: list, dtype: str):
    """Gathered inputs of ``dtype`` (scalar loads, one per lane) as one float32 vector. A bf16 input is assembled
    as 16-bit words, widened and shifted up (a bf16 is the upper half of its float32): LLVM's bf16-to-float
    conversion of the assembled vector made the one-token gather kernel 1.7-1.8x slower on a bf16 input than on a
    float32 one (Zen 4, 2048x768 and 768x2048 at 70%: 201-210 vs 116-120 us); assembled as words it runs as fast
    as on float32 (108-121 us), with the same bits."""
    if dtype != "bfloat16":
        return _wide(T.Shuffle(lanes, list(range(len(lanes)))), dtype, len(lanes))
    n = len(lanes)
    words = T.Cast(f"uint32x{n}", T.Shuffle([T.reinterpret("uint16", lane) for lane in lanes], list(range(n))))
    return T.reinterpret(f"float32x{n}", T.shift_left(words, T.broadcast(T.uint32(16), n)))


def _lanes_sum(acc, *lead):
    """The 8 lanes of ``acc[*lead, :]`` summed pairwise (lane i with lane i + 4 first): the one-token kernels'
    horizontal reduction, in one order everywhere."""
    lane = [acc[(*lead, i)] for i in range(VEC)]
    return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]))


def _narrow(value, dtype: str, lanes: int = 1):
    """A float32 result stored as ``dtype`` (the rounding torch's ``.to`` does: to nearest even)."""
    if dtype == "float32":
        return value
    return T.Cast(dtype if lanes == 1 else f"{dtype}x{lanes}", value)


def _align(dtype: str) -> int:
    """Element alignment in bytes (kernels assume no more: any torch view has it)."""
    return 2 if dtype in ("bfloat16", "float16", "int16") else 4


@dataclass(frozen=True)
class KernelKey:
    """Everything a compiled kernel is specialised on; part of the on-disk cache key."""

    kind: str          # "gemv" | "spmm" | "spmm_kb" | "spmm_flat" | "tiled" | "tiled_flat" | "nm_gemv" | ...
    k: int             # fan-in; for nm_gemv the number of groups of 4 along K
    tokens: int
    index_dtype: str
    dtype: str
    bias: bool
    #: False: the caller splits the block range over threads (the eager runtime, on torch's threads); True:
    #: the kernel splits it on TVM's own pool (a TVM library, which runs without torch).
    parallel: bool = False
    #: The tiled kernels' register tile and vector lanes (``tokens`` is then the padded token count).
    tile: Optional[Tile] = None
    lanes: int = VEC
    #: The dtype of the one-token kernels' input and output (`fanin_gemv`, `mask_gemv`): float32, or the
    #: layer's own bf16 / fp16, read and written in place of a conversion before and after the call (two torch
    #: conversions cost 10-20 us, a tenth of a decode step's layer). For the tiled kernel, its input's dtype
    #: (float32, or bf16 tokens-last in the `SPLIT_DTYPE` layout: half the bytes a float32 input moves); for
    #: `pack`, `pack16` and `unpack`, the dtype of the tokens-first tensor they read or write.
    io: str = "float32"

    def name(self) -> str:
        bias = "b" if self.bias else "nb"
        par = "_par" if self.parallel else ""
        tile = f"_{self.tile.name()}" if self.tile is not None else ""
        tile += f"x{self.lanes}" if self.tile is not None or self.lanes != VEC else ""
        tile += f"_io{self.io}" if self.io != "float32" else ""
        return f"sparsecc_{self.kind}_k{self.k}_t{self.tokens}_{self.index_dtype}_{self.dtype}_{bias}{par}{tile}"

    def loop(self):
        """The loop over the parts of the block range: parallel on TVM's pool, or one serial part."""
        return T.parallel if self.parallel else T.serial

    def parts(self) -> int:
        """How many contiguous shares of the block range ``[b0, b1)`` the kernel cuts (`loop` runs over them).
        One parallel iteration per block cost 3x at one thread (a 90% GEMV 249 vs 80 us): TVM's parallel
        loop body is a closure whose loop-invariant setup runs per iteration."""
        return PARTS if self.parallel else 1


def blocks(kind: str, rows: int, tile: Optional[Tile] = None) -> int:
    """The block range a row kernel of ``kind`` covers for ``rows`` live rows (rows, or row blocks)."""
    if tile is not None:
        return -(-rows // tile.rows)
    return -(-rows // ROWS) if kind in ("spmm", "spmm_kb", "spmm_flat") else rows


def build(key: KernelKey):
    """The PrimFunc for ``key`` (not yet compiled). Every kernel takes the block range ``[b0, b1)`` it computes
    just before its output, the last argument; once-only work (ablated rows, edges) is done by the call with
    ``b0 == 0``."""
    builder = {"gemv": fanin_gemv, "spmm": fanin_spmm, "spmm_kb": fanin_spmm, "spmm_flat": fanin_spmm,
               "tiled": fanin_tiled, "tiled_flat": fanin_tiled, "nm_gemv": nm_gemv,
               "nm_gemv_avx": nm_gemv_avx, "mask_gemv": mask_gemv, "transpose": transpose, "pack": pack,
               "pack16": pack16, "unpack": unpack, "dense_gemv": dense_gemv}[key.kind]
    return builder(key).with_attr("global_symbol", key.name())


def fanin_gemv(key: KernelKey):
    """One token: ``x [1, in]`` (callers loop over a few tokens), ``x`` and ``y`` in ``key.io``."""
    K, IDX, VDT, BIAS, IO = key.k, key.index_dtype, key.dtype, key.bias, key.io
    DT = "float32"
    NV = K // VEC                   # full vectors of the fan-in
    NC = NV // CHAINS * CHAINS      # of which handled CHAINS at a time
    loop, P = key.loop(), key.parts()

    @T.macro
    def step(acc, c, x, v, idx, r, jo):
        # The gathered inputs are assembled lane by lane from scalar index loads: a vector index load would be
        # extracted lane by lane, competing with the inserts for the shuffle ports.
        acc[c, T.ramp(0, 1, VEC)] = acc[c, T.ramp(0, 1, VEC)] + _wide(v[r, T.ramp(jo * VEC, 1, VEC)], VDT, VEC) * \
            _gathered([x[0, T.Cast("int32", idx[r, jo * VEC + lane])] for lane in range(VEC)], IO)

    @T.prim_func
    def gemv(x_h: T.handle, v_h: T.handle, i_h: T.handle, orow_h: T.handle, arow_h: T.handle, b_h: T.handle,
             b0: T.int32, b1: T.int32, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int32()
        A = T.int32()
        IN = T.int32()
        OUT = T.int32()
        x = T.match_buffer(x_h, (1, IN), IO, align=_align(IO))
        v = T.match_buffer(v_h, (R, K), VDT, align=_align(VDT))
        idx = T.match_buffer(i_h, (R, K), IDX, align=2)
        orow = T.match_buffer(orow_h, (R,), "int32", align=4)
        arow = T.match_buffer(arow_h, (A,), "int32", align=4)
        b = T.match_buffer(b_h, (OUT,), DT, align=4)
        y = T.match_buffer(y_h, (1, OUT), IO, align=_align(IO))
        for part in loop(P):
            for r in range(b0 + (b1 - b0) * part // P, b0 + (b1 - b0) * (part + 1) // P):
                # CHAINS independent accumulators hide the FMA latency a single running sum would expose.
                acc = T.decl_buffer((CHAINS, VEC), DT, scope="global")
                tail = T.decl_buffer((1,), DT, scope="global")
                for c in T.unroll(CHAINS):
                    acc[c, T.ramp(0, 1, VEC)] = T.broadcast(T.cast(0, DT), VEC)
                tail[0] = T.cast(0, DT)
                for jc in range(NC // CHAINS):
                    for c in T.unroll(CHAINS):
                        step(acc, c, x, v, idx, r, jc * CHAINS + c)
                for jo in range(NC, NV):
                    step(acc, 0, x, v, idx, r, jo)
                for j in range(NV * VEC, K):
                    tail[0] = tail[0] + _wide(v[r, j], VDT) * _wide(x[0, T.Cast("int32", idx[r, j])], IO)
                for c in T.unroll(1, CHAINS):
                    acc[0, T.ramp(0, 1, VEC)] = acc[0, T.ramp(0, 1, VEC)] + acc[c, T.ramp(0, 1, VEC)]
                total = T.meta_var(_lanes_sum(acc, 0) + tail[0])
                if BIAS:
                    y[0, orow[r]] = _narrow(total + b[orow[r]], IO)
                else:
                    y[0, orow[r]] = _narrow(total, IO)
        if b0 == 0:
            for a in range(A):
                if BIAS:
                    y[0, arow[a]] = _narrow(b[arow[a]], IO)
                else:
                    y[0, arow[a]] = T.cast(0, IO)

    return gemv


#: Rows of a `dense_gemv` block: they share each loaded input vector.
DENSE_ROWS = 4


def dense_gemv(key: KernelKey):
    """The dense op of a bf16 / fp16 layer at one token: ``y [1, out] = x [1, in] @ w [out, in].T + b``, ``w`` in
    ``key.dtype`` (the layer's, decoded once), ``x`` and ``y`` in ``key.io``, products summed in float32. Why a
    kernel of its own: torch's bf16 and fp16 GEMV on a CPU without AVX512_BF16 / AVX512_FP16 converts as it goes
    at a fraction of its float32 rate (AMD EPYC Zen 3, AVX2, 1 thread, 768x768: float32 86 us, bf16 158 us, fp16
    134 us), so a bf16 decode step ran every layer that stays dense slower than it could, and the measured choice
    compared sparse kernels against that. `DENSE_ROWS` rows share each input vector; two chains per row hide
    the FMA latency. The block range is over row blocks (``b1 - b0`` of them; the last may be short)."""
    VDT, BIAS, IO = key.dtype, key.bias, key.io
    DT = "float32"
    RD, C = DENSE_ROWS, 2
    loop, P = key.loop(), key.parts()

    @T.macro
    def rows(x, w, b, y, r0, NR, IN):
        acc = T.decl_buffer((NR, C, VEC), DT, scope="global")
        tail = T.decl_buffer((NR,), DT, scope="global")
        for q in T.unroll(NR):
            tail[q] = T.cast(0, DT)
            for c in T.unroll(C):
                acc[q, c, T.ramp(0, 1, VEC)] = T.broadcast(T.cast(0, DT), VEC)
        for jc in range(IN // (VEC * C)):
            for c in T.unroll(C):
                for q in T.unroll(NR):
                    acc[q, c, T.ramp(0, 1, VEC)] = acc[q, c, T.ramp(0, 1, VEC)] + \
                        _wide(w[r0 + q, T.ramp((jc * C + c) * VEC, 1, VEC)], VDT, VEC) * \
                        _wide(x[0, T.ramp((jc * C + c) * VEC, 1, VEC)], IO, VEC)
        for j in range(IN // (VEC * C) * (VEC * C), IN):
            for q in T.unroll(NR):
                tail[q] = tail[q] + _wide(w[r0 + q, j], VDT) * _wide(x[0, j], IO)
        for q in T.unroll(NR):
            acc[q, 0, T.ramp(0, 1, VEC)] = acc[q, 0, T.ramp(0, 1, VEC)] + acc[q, 1, T.ramp(0, 1, VEC)]
            total = T.meta_var(_lanes_sum(acc, q, 0) + tail[q])
            if BIAS:
                y[0, r0 + q] = _narrow(total + b[r0 + q], IO)
            else:
                y[0, r0 + q] = _narrow(total, IO)

    @T.prim_func
    def gemv(x_h: T.handle, w_h: T.handle, b_h: T.handle, b0: T.int32, b1: T.int32, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        IN = T.int32()
        OUT = T.int32()
        x = T.match_buffer(x_h, (1, IN), IO, align=_align(IO))
        w = T.match_buffer(w_h, (OUT, IN), VDT, align=_align(VDT))
        b = T.match_buffer(b_h, (OUT,), DT, align=4)
        y = T.match_buffer(y_h, (1, OUT), IO, align=_align(IO))
        for part in loop(P):
            for rb in range(b0 + (b1 - b0) * part // P, b0 + (b1 - b0) * (part + 1) // P):
                if rb * RD + RD <= OUT:
                    rows(x, w, b, y, rb * RD, RD, IN)
                else:
                    for q in range(OUT - rb * RD):
                        rows(x, w, b, y, rb * RD + q, 1, IN)

    return gemv


def fanin_spmm(key: KernelKey):
    K, NT, IDX, DT, BIAS, FLAT = key.k, key.tokens, key.index_dtype, key.dtype, key.bias, key.kind == "spmm_flat"
    KB = key.kind == "spmm_kb"
    NTB = NT // TOKENS
    # The remainder is covered by power-of-two tiles of 16, 8, 4, 2 and 1 tokens (each present or not, at
    # offset S16.. ): LLVM keeps those in registers, odd widths it spills.
    rest = NT - NTB * TOKENS
    S16 = NTB * TOKENS
    S8 = S16 + (rest & 16)
    S4 = S8 + (rest & 8)
    S2 = S4 + (rest & 4)
    S1 = S2 + (rest & 2)
    H16, H8, H4, H2, H1 = (bool(rest & w) for w in (16, 8, 4, 2, 1))
    loop, P = key.loop(), key.parts()

    @T.macro
    def tile(xt, v, idx, orow, b, y, r0, nrows, t0, width):
        acc = T.decl_buffer((ROWS, width), DT, scope="global")
        for q in T.unroll(nrows):
            for t in T.vectorized(width):
                acc[q, t] = T.cast(0, DT)
        for j in range(K):
            for q in T.unroll(nrows):
                for t in T.vectorized(width):
                    if FLAT:
                        acc[q, t] = acc[q, t] + v[r0 + q, j] * xt[idx[r0 + q, j] + t0 + t]
                    else:
                        acc[q, t] = acc[q, t] + v[r0 + q, j] * xt[T.Cast("int32", idx[r0 + q, j]), t0 + t]
        for q in T.unroll(nrows):
            for t in T.vectorized(width):
                y[orow[r0 + q], t0 + t] = acc[q, t] + (b[orow[r0 + q]] if BIAS else T.cast(0, DT))

    @T.macro
    def chunk(xt, v, idx, orow, y, r0, nrows, t0, width, j0, nj):
        acc = T.decl_buffer((ROWS, width), DT, scope="global")
        for q in T.unroll(nrows):
            for t in T.vectorized(width):
                acc[q, t] = y[orow[r0 + q], t0 + t]
        for j in range(nj):
            for q in T.unroll(nrows):
                for t in T.vectorized(width):
                    acc[q, t] = acc[q, t] + v[r0 + q, j0 + j] * xt[T.Cast("int32", idx[r0 + q, j0 + j]), t0 + t]
        for q in T.unroll(nrows):
            for t in T.vectorized(width):
                y[orow[r0 + q], t0 + t] = acc[q, t]

    @T.macro
    def chunk_rows(xt, v, idx, orow, y, R, lo, hi, t0, width, j0, nj):
        for rb in range(lo, hi):
            if rb * ROWS + ROWS <= R:
                chunk(xt, v, idx, orow, y, rb * ROWS, ROWS, t0, width, j0, nj)
            else:
                chunk(xt, v, idx, orow, y, rb * ROWS, 1, t0, width, j0, nj)

    @T.macro
    def rows_kb(xt, v, idx, orow, b, y, R, lo, hi, t0, width):
        # Every row pair in [lo, hi) sweeps the same CHUNK values' inputs before the next chunk, so the
        # gathered inputs stay in L1; partial sums live in the output (bias first).
        for rb in range(lo, hi):
            for q in range(T.min(ROWS, R - rb * ROWS)):
                for t in T.vectorized(width):
                    y[orow[rb * ROWS + q], t0 + t] = b[orow[rb * ROWS + q]] if BIAS else T.cast(0, DT)
        for c in range(K // CHUNK):
            chunk_rows(xt, v, idx, orow, y, R, lo, hi, t0, width, c * CHUNK, CHUNK)
        if K % CHUNK > 0:
            chunk_rows(xt, v, idx, orow, y, R, lo, hi, t0, width, K // CHUNK * CHUNK, K % CHUNK)

    @T.macro
    def rows_at(xt, v, idx, orow, b, y, R, b0, b1, t0, width):
        if KB:
            # One contiguous share of the row range per part: on TVM's pool (`parallel`) one region per token
            # tile, each part keeping the chunk order; called by sparsecc's launcher, one part.
            for part in loop(P):
                rows_kb(xt, v, idx, orow, b, y, R, b0 + (b1 - b0) * part // P, b0 + (b1 - b0) * (part + 1) // P,
                        t0, width)
        else:
            for part in loop(P):
                for rb in range(b0 + (b1 - b0) * part // P, b0 + (b1 - b0) * (part + 1) // P):
                    if rb * ROWS + ROWS <= R:
                        tile(xt, v, idx, orow, b, y, rb * ROWS, ROWS, t0, width)
                    else:
                        tile(xt, v, idx, orow, b, y, rb * ROWS, 1, t0, width)

    @T.prim_func
    def spmm(xt_h: T.handle, v_h: T.handle, i_h: T.handle, orow_h: T.handle, arow_h: T.handle, b_h: T.handle,
             b0: T.int32, b1: T.int32, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int32()
        A = T.int32()
        IN = T.int32()
        OUT = T.int32()
        xt = T.match_buffer(xt_h, (IN,) if FLAT else (IN, NT), DT, align=4)
        v = T.match_buffer(v_h, (R, K), DT, align=4)
        idx = T.match_buffer(i_h, (R, K), IDX, align=2)
        orow = T.match_buffer(orow_h, (R,), "int32", align=4)
        arow = T.match_buffer(arow_h, (A,), "int32", align=4)
        b = T.match_buffer(b_h, (OUT,), DT, align=4)
        y = T.match_buffer(y_h, (OUT, NT), DT, align=4)
        for tb in range(NTB):
            rows_at(xt, v, idx, orow, b, y, R, b0, b1, tb * TOKENS, TOKENS)
        if H16:
            rows_at(xt, v, idx, orow, b, y, R, b0, b1, S16, 16)
        if H8:
            rows_at(xt, v, idx, orow, b, y, R, b0, b1, S8, 8)
        if H4:
            rows_at(xt, v, idx, orow, b, y, R, b0, b1, S4, 4)
        if H2:
            rows_at(xt, v, idx, orow, b, y, R, b0, b1, S2, 2)
        if H1:
            rows_at(xt, v, idx, orow, b, y, R, b0, b1, S1, 1)
        if b0 == 0:
            for a in range(A):
                for t in range(NT):
                    y[arow[a], t] = b[arow[a]] if BIAS else T.cast(0, DT)

    return spmm


def token_tiles(tokens: int, width: int, vectors: int) -> list[tuple[int, int, int]]:
    """The token tiles of `fanin_tiled` for ``tokens`` (padded) tokens: as few tiles of at most ``vectors``
    vectors as cover them, of balanced widths (13 vectors in tiles of 4 are 4+3+3+3, not 4+4+4+1: a 1-vector
    tile has too few accumulators to hide the FMA latency), as runs ``(width, first vector, count)`` of equal
    width."""
    total = tokens // width
    count = -(-total // vectors)
    widths = [total // count + (1 if i < total % count else 0) for i in range(count)]
    runs: list[tuple[int, int, int]] = []
    start = 0
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1] = (w, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((w, start, 1))
        start += w
    return runs


def fanin_tiled(key: KernelKey):
    """Many tokens, the tile a parameter. ``xt`` is the input ``[in, NTP]`` flattened (``tiled``: index ``i``
    reads row ``i * NTP``) or a flat plane stack read at int32 offsets (``tiled_flat``: a stride-1 convolution's
    taps); ``y`` is ``[out, NTP]``. ``NTP = key.tokens`` is a multiple of the lanes, cut in `token_tiles`. The
    accumulators are ``rows x width`` separate vectors of the CPU's width (one ``<64 x float>`` vector spilled
    from 8 vectors on, and its remainder tiles were odd widths). Per tile, the thread's rows are swept chunk by
    chunk (`Tile.chunk`); the first chunk starts from the bias, the others from the partial sums in ``y``.

    The fan-in is a runtime value where ``key.k`` is 0: one compiled kernel per tile, token count and index
    type serves every layer (a ResNet has a fan-in per layer; a tile search compiles every candidate), and each
    tile's loop body is emitted four times, not per chunk kind. Small fan-ins (`STATIC_K`) are compiled in:
    LLVM then unrolls the whole fan-in loop (a 1x1 convolution of 64 channels at 90% has 6 values a row, and
    a runtime loop of 6 cost it a third of its speed)."""
    NTP, IDX, VDT, BIAS, TL, L, KS = key.tokens, key.index_dtype, key.dtype, key.bias, key.tile, key.lanes, key.k
    DT = "float32"
    FLAT = key.kind == "tiled_flat"
    ROWS_, CH = TL.rows, TL.chunk
    WINDOWED = TL.window > 0          # swept by window (`windows`), else by chunk (`slab`)
    K = KS if KS else tvm.tirx.Var("K", "int32")
    # A bf16 input is read as 32-bit words (`SPLIT_DTYPE`): one load per two token vectors (a "unit" of U
    # vectors), each an accumulator of its own; a float32 input one vector per load.
    SPLIT = key.io == SPLIT_DTYPE
    assert SPLIT or key.io == "float32", key.io
    U = 2 if SPLIT else 1
    XDT = "int32" if SPLIT else "float32"
    ROW = NTP // U                    # elements of ``xt`` per input row
    assert NTP % (L * U) == 0 and not (SPLIT and FLAT), (NTP, L, key.io, key.kind)
    runs = token_tiles(NTP, L * U, max(1, TL.vectors // U)) + [(1, 0, 0)]   # a second, empty run when all equal
    (W0, S0, N0), (W1, S1, N1) = runs[0], runs[1]
    loop, P = key.loop(), key.parts()

    def term(value, xt, index, u, half, t):
        # one product of the tile: the value times input lane ``t`` of the unit's ``half``-th vector
        if SPLIT:
            word = xt[index * ROW + u * L + t]
            bits = T.shift_left(word, 16) if half == 0 else T.bitwise_and(word, T.int32(-65536))
            return _wide(value, VDT) * T.reinterpret(DT, bits)
        if FLAT:
            return _wide(value, VDT) * xt[index + u * L + t]
        return _wide(value, VDT) * xt[index * NTP + u * L + t]

    @T.macro
    def begin(acc, b, y, orow, r0, nrows, v0, W, first):
        # ``v0`` and ``W``: the first unit and the unit count; accumulator ``[q, u * U + h]`` holds the tokens
        # of unit ``u``'s ``h``-th vector, stored at ``((v0 + u) * U + h) * L`` in ``y``. The first sweep starts
        # from the bias, later ones from the partial sums in ``y``.
        if first:
            for q in T.unroll(nrows):
                for u in T.unroll(W * U):
                    for t in T.vectorized(L):
                        acc[q, u, t] = b[orow[r0 + q]] if BIAS else T.cast(0, DT)
        else:
            for q in T.unroll(nrows):
                for u in T.unroll(W * U):
                    for t in T.vectorized(L):
                        acc[q, u, t] = y[orow[r0 + q], (v0 * U + u) * L + t]

    @T.macro
    def accumulate(acc, xt, v, idx, r, q, j, v0, W):
        # row ``r``'s ``j``-th value times its input's tokens, into the accumulators of the tile's row ``q``
        for u in T.unroll(W):
            for t in T.vectorized(L):
                acc[q, u * U, t] = acc[q, u * U, t] + term(v[r, j], xt, T.Cast("int32", idx[r, j]), v0 + u, 0, t)
            if SPLIT:
                for t in T.vectorized(L):
                    acc[q, u * U + 1, t] = acc[q, u * U + 1, t] + term(
                        v[r, j], xt, T.Cast("int32", idx[r, j]), v0 + u, 1, t)

    @T.macro
    def end(acc, y, orow, r0, nrows, v0, W):
        for q in T.unroll(nrows):
            for u in T.unroll(W * U):
                for t in T.vectorized(L):
                    y[orow[r0 + q], (v0 * U + u) * L + t] = acc[q, u, t]

    @T.macro
    def tile(xt, v, idx, orow, b, y, r0, nrows, v0, W, j0, nj):
        acc = T.decl_buffer((ROWS_, W * U, L), DT, scope="global")
        begin(acc, b, y, orow, r0, nrows, v0, W, j0 == 0)
        for j in range(nj):
            for q in T.unroll(nrows):
                accumulate(acc, xt, v, idx, r0 + q, q, j0 + j, v0, W)
        end(acc, y, orow, r0, nrows, v0, W)

    @T.macro
    def slab(xt, v, idx, orow, b, y, R, K, b0, b1, v0, W):
        chunk = T.meta_var(K if CH == 0 else T.min(CH, K))
        for part in loop(P):
            lo = T.meta_var(b0 + (b1 - b0) * part // P)
            hi = T.meta_var(b0 + (b1 - b0) * (part + 1) // P)
            for c in range((K + chunk - 1) // chunk):
                for rb in range(lo, hi):
                    if rb * ROWS_ + ROWS_ <= R:
                        tile(xt, v, idx, orow, b, y, rb * ROWS_, ROWS_, v0, W, c * chunk, T.min(chunk, K - c * chunk))
                    else:
                        for q in range(R - rb * ROWS_):
                            tile(xt, v, idx, orow, b, y, rb * ROWS_ + q, 1, v0, W, c * chunk,
                                 T.min(chunk, K - c * chunk))

    @T.macro
    def window(xt, v, idx, orow, b, y, wp, r0, nrows, v0, W, c):
        # Window ``c`` of rows ``r0 ..``: row ``r0 + q``'s values ``wp[r0 + q, c] ..< wp[r0 + q, c + 1]``. The
        # rows step together for as many values as each has in the window, then each alone for its rest.
        acc = T.decl_buffer((ROWS_, W * U, L), DT, scope="global")
        begin(acc, b, y, orow, r0, nrows, v0, W, c == 0)
        both = T.meta_var(functools.reduce(T.min, [wp[r0 + q, c + 1] - wp[r0 + q, c] for q in range(nrows)]))
        for j in range(both):
            for q in T.unroll(nrows):
                accumulate(acc, xt, v, idx, r0 + q, q, wp[r0 + q, c] + j, v0, W)
        if nrows > 1:
            for q in T.unroll(nrows):
                for j in range(wp[r0 + q, c + 1] - wp[r0 + q, c] - both):
                    accumulate(acc, xt, v, idx, r0 + q, q, wp[r0 + q, c] + both + j, v0, W)
        end(acc, y, orow, r0, nrows, v0, W)

    @T.macro
    def windows(xt, v, idx, orow, b, y, wp, R, NW, b0, b1, v0, W):
        for part in loop(P):
            lo = T.meta_var(b0 + (b1 - b0) * part // P)
            hi = T.meta_var(b0 + (b1 - b0) * (part + 1) // P)
            for c in range(NW):
                for rb in range(lo, hi):
                    if rb * ROWS_ + ROWS_ <= R:
                        window(xt, v, idx, orow, b, y, wp, rb * ROWS_, ROWS_, v0, W, c)
                    else:
                        for q in range(R - rb * ROWS_):
                            window(xt, v, idx, orow, b, y, wp, rb * ROWS_ + q, 1, v0, W, c)

    @T.prim_func
    def tiled(xt_h: T.handle, v_h: T.handle, i_h: T.handle, orow_h: T.handle, arow_h: T.handle, b_h: T.handle,
              w_h: T.handle, b0: T.int32, b1: T.int32, y_h: T.handle):
        # ``w_h``: the window table of a windowed tile (`Tile.window`), ``[R, windows + 1]``; any ``[n, 2]``
        # table (unread) for a chunked one.
        T.func_attr({"tirx.noalias": True})
        R = T.int32()
        A = T.int32()
        XN = T.int32()
        OUT = T.int32()
        WR = T.int32()
        NW1 = T.int32()
        xt = T.match_buffer(xt_h, (XN,), XDT, align=_align(XDT))
        v = T.match_buffer(v_h, (R, K), VDT, align=_align(VDT))
        idx = T.match_buffer(i_h, (R, K), IDX, align=2)
        orow = T.match_buffer(orow_h, (R,), "int32", align=4)
        arow = T.match_buffer(arow_h, (A,), "int32", align=4)
        b = T.match_buffer(b_h, (OUT,), DT, align=4)
        wp = T.match_buffer(w_h, (WR, NW1), "int32", align=4)
        y = T.match_buffer(y_h, (OUT, NTP), DT, align=4)
        if WINDOWED:
            for i in range(N0):
                windows(xt, v, idx, orow, b, y, wp, R, NW1 - 1, b0, b1, S0 + i * W0, W0)
            for i in range(N1):
                windows(xt, v, idx, orow, b, y, wp, R, NW1 - 1, b0, b1, S1 + i * W1, W1)
        else:
            for i in range(N0):
                slab(xt, v, idx, orow, b, y, R, K, b0, b1, S0 + i * W0, W0)
            for i in range(N1):
                slab(xt, v, idx, orow, b, y, R, K, b0, b1, S1 + i * W1, W1)
        if b0 == 0:
            for a in range(A):
                for t in range(NTP):
                    y[arow[a], t] = b[arow[a]] if BIAS else T.cast(0, DT)

    return tiled


MASK_BLOCK = 32    # inputs per bit-mask word of `mask_gemv`


def _selected(bits, lanes: int):
    """The lanes of a ``lanes``-bit word's set bits, as a bool vector (one mask register on AVX-512)."""
    return T.bitwise_and(T.broadcast(bits, lanes), T.shift_left(T.broadcast(T.uint32(1), lanes),
                                                                  T.ramp(T.uint32(0), T.uint32(1), lanes))) \
        != T.broadcast(T.uint32(0), lanes)


def mask_gemv(key: KernelKey):
    """One token, bf16 values stored as a bit mask per 32 inputs and the kept values packed in input order
    (``start[r]``: row ``r``'s first value). Per 32 inputs: one 32-bit mask word, one expanding load of the
    word's values into their lanes (``vpexpandw``, AVX512_VBMI2), then two float32 multiply-adds: a bf16 is
    the upper half of its float32, so the even inputs' values are the 32-bit lanes shifted left by 16 and the
    odd inputs' the lanes with the low half cleared, against the input split into even (``xe``) and odd
    (``xo``) positions once per call. No gather: the gather kernel's lane inserts (one per value on one
    shuffle port) bounded it at about a value per cycle; this reads 2.25 bytes per kept value plus 1/8 byte
    per input (70% sparsity: 0.8 bytes per input, dense bf16 2). ``key.k`` is the padded input width (a
    multiple of 32), ``key.dtype`` "bfloat16". With ``key.io`` "bfloat16" the output is bf16 and ``xe`` and
    ``xo`` are both the bf16 input read as 32-bit pairs (the caller passes it twice): the even input is a pair's
    low half shifted up, the odd one its high half, the same trick as for the values, so no call splits or
    widens the input first.

    ``key.dtype`` "float16": an fp16 is no half of a float32, so the expanded word is converted (``vcvtph2ps``,
    F16C) as its first and last 16 lanes, against the input's first and last 16 of the 32 (``xe`` and ``xo`` are
    then both the input itself, float32 or, with ``key.io`` "float16", fp16 widened in the kernel)."""
    IN, BIAS, IO, VDT = key.k, key.bias, key.io, key.dtype
    NB = IN // MASK_BLOCK
    HALF = MASK_BLOCK // 2
    PAIRS = IO == "bfloat16"
    HALVES = VDT == "float16"
    XDT = "int32" if PAIRS else IO       # torch has no uint32 views
    XN = IN if HALVES else IN // 2
    loop, P = key.loop(), key.parts()

    def lower(w):
        # the first 16 of the word's 32 values, as float32
        if HALVES:
            return T.Cast(f"float32x{HALF}", T.Shuffle([T.reinterpret(f"float16x{MASK_BLOCK}", w)], list(range(HALF))))
        return T.reinterpret(f"float32x{HALF}", T.shift_left(T.reinterpret(f"uint32x{HALF}", w),
                                                              T.broadcast(T.uint32(16), HALF)))

    def upper(w):
        if HALVES:
            return T.Cast(f"float32x{HALF}", T.Shuffle([T.reinterpret(f"float16x{MASK_BLOCK}", w)],
                                                       list(range(HALF, MASK_BLOCK))))
        return T.reinterpret(f"float32x{HALF}", T.bitwise_and(T.reinterpret(f"uint32x{HALF}", w),
                                                               T.broadcast(T.uint32(0xFFFF0000), HALF)))

    def even(xe, blk):
        # the inputs the lower values multiply: even positions (bf16 pairs), or the word's first 16 (fp16)
        if HALVES:
            return _wide(xe[T.ramp(blk * MASK_BLOCK, 1, HALF)], IO, HALF)
        if PAIRS:
            return T.reinterpret(f"float32x{HALF}", T.shift_left(
                T.reinterpret(f"uint32x{HALF}", xe[T.ramp(blk * HALF, 1, HALF)]), T.broadcast(T.uint32(16), HALF)))
        return xe[T.ramp(blk * HALF, 1, HALF)]

    def odd(xo, blk):
        if HALVES:
            return _wide(xo[T.ramp(blk * MASK_BLOCK + HALF, 1, HALF)], IO, HALF)
        if PAIRS:
            return T.reinterpret(f"float32x{HALF}", T.bitwise_and(
                T.reinterpret(f"uint32x{HALF}", xo[T.ramp(blk * HALF, 1, HALF)]),
                T.broadcast(T.uint32(0xFFFF0000), HALF)))
        return xo[T.ramp(blk * HALF, 1, HALF)]

    def expanded(bits, v, pos, r, blk):
        # The word's kept values in their lanes (16-bit each). An expression (used twice, one load after
        # LLVM's CSE), not an assignment: TVMScript makes an assigned vector a buffer, stored to at every block.
        return T.call_llvm_pure_intrin(
            f"int16x{MASK_BLOCK}", f"llvm.masked.expandload.v{MASK_BLOCK}i16", T.address_of(v[pos[0]]),
            _selected(T.reinterpret("uint32", bits[r, blk]), MASK_BLOCK), T.broadcast(T.int16(0), MASK_BLOCK))

    @T.macro
    def step(acc, c, xe, xo, bits, v, pos, r, blk):
        acc[c, T.ramp(0, 1, HALF)] = acc[c, T.ramp(0, 1, HALF)] + lower(expanded(bits, v, pos, r, blk)) * even(xe, blk)
        acc[c + CHAINS, T.ramp(0, 1, HALF)] = acc[c + CHAINS, T.ramp(0, 1, HALF)] + \
            upper(expanded(bits, v, pos, r, blk)) * odd(xo, blk)
        pos[0] = pos[0] + T.Cast("int32", T.popcount(T.reinterpret("uint32", bits[r, blk])))

    @T.prim_func
    def gemv(xe_h: T.handle, xo_h: T.handle, m_h: T.handle, v_h: T.handle, s_h: T.handle, orow_h: T.handle,
             arow_h: T.handle, b_h: T.handle, b0: T.int32, b1: T.int32, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int32()
        NV = T.int32()
        A = T.int32()
        OUT = T.int32()
        xe = T.match_buffer(xe_h, (XN,), XDT, align=_align(XDT))
        xo = T.match_buffer(xo_h, (XN,), XDT, align=_align(XDT))
        bits = T.match_buffer(m_h, (R, NB), "int32", align=4)     # the words' bits (torch has no uint32 math)
        v = T.match_buffer(v_h, (NV,), "int16", align=2)
        start = T.match_buffer(s_h, (R,), "int32", align=4)
        orow = T.match_buffer(orow_h, (R,), "int32", align=4)
        arow = T.match_buffer(arow_h, (A,), "int32", align=4)
        b = T.match_buffer(b_h, (OUT,), "float32", align=4)
        y = T.match_buffer(y_h, (1, OUT), IO, align=_align(IO))
        for part in loop(P):
            for r in range(b0 + (b1 - b0) * part // P, b0 + (b1 - b0) * (part + 1) // P):
                acc = T.decl_buffer((2 * CHAINS, HALF), "float32", scope="global")
                pos = T.decl_buffer((1,), "int32", scope="global")
                for c in T.unroll(2 * CHAINS):
                    acc[c, T.ramp(0, 1, HALF)] = T.broadcast(T.float32(0), HALF)
                pos[0] = start[r]
                for bo in range(NB // CHAINS):
                    for c in T.unroll(CHAINS):
                        step(acc, c, xe, xo, bits, v, pos, r, bo * CHAINS + c)
                for blk in range(NB // CHAINS * CHAINS, NB):
                    step(acc, 0, xe, xo, bits, v, pos, r, blk)
                for c in T.unroll(1, 2 * CHAINS):
                    acc[0, T.ramp(0, 1, HALF)] = acc[0, T.ramp(0, 1, HALF)] + acc[c, T.ramp(0, 1, HALF)]
                total = T.decl_buffer((1,), "float32", scope="global")
                total[0] = b[orow[r]] if BIAS else T.float32(0)
                for lane in range(HALF):
                    total[0] = total[0] + acc[0, lane]
                y[0, orow[r]] = _narrow(total[0], IO)
        if b0 == 0:
            for a in range(A):
                y[0, arow[a]] = _narrow(b[arow[a]] if BIAS else T.float32(0), IO)

    return gemv


@T.macro
def _nm_epilogue(acc, y, b, r, BIAS):
    for c in T.unroll(1, CHAINS):
        acc[0, T.ramp(0, 1, VEC)] = acc[0, T.ramp(0, 1, VEC)] + acc[c, T.ramp(0, 1, VEC)]
    total = T.meta_var(_lanes_sum(acc, 0))
    if BIAS:
        y[0, r] = total + b[r]
    else:
        y[0, r] = total


def nm_gemv(key: KernelKey):
    """2:4 along K for one token, portable. ``xq [4, in/4]`` holds the input de-interleaved by position in its
    group (``xq[c, g] = x[4g + c]``): the two kept inputs of 8 groups are picked with vector selects from 4
    contiguous loads, each group's 2-bit positions coming from one 32-bit metadata load per 8 groups."""
    VDT, BIAS = key.dtype, key.bias
    DT = "float32"
    G = key.k           # groups of 4 along K (in_features / 4); a multiple of 8
    NB = G // VEC
    loop, P = key.loop(), key.parts()

    @T.macro
    def step(acc, c, xq, v, meta, r, go):
        word = T.meta_var(T.reinterpret("uint32", meta[r, T.ramp(go * 4, 1, 4)]))
        nib = T.meta_var(T.shift_right(T.broadcast(word, VEC), T.ramp(T.uint32(0), T.uint32(4), VEC)))
        x0, x1 = T.meta_var(xq[0, T.ramp(go * VEC, 1, VEC)]), T.meta_var(xq[1, T.ramp(go * VEC, 1, VEC)])
        x2, x3 = T.meta_var(xq[2, T.ramp(go * VEC, 1, VEC)]), T.meta_var(xq[3, T.ramp(go * VEC, 1, VEC)])
        one = T.meta_var(T.broadcast(T.uint32(1), VEC))
        zero = T.meta_var(T.broadcast(T.uint32(0), VEC))
        s0 = T.meta_var(T.bitwise_and(nib, one) != zero)
        s1 = T.meta_var(T.bitwise_and(T.shift_right(nib, one), one) != zero)
        s2 = T.meta_var(T.bitwise_and(T.shift_right(nib, T.broadcast(T.uint32(2), VEC)), one) != zero)
        s3 = T.meta_var(T.bitwise_and(T.shift_right(nib, T.broadcast(T.uint32(3), VEC)), one) != zero)
        # p0 = bits 0-1, p1 = bits 2-3: the low bit picks within a pair of inputs, the high bit between pairs.
        first = T.meta_var(T.Select(s1, T.Select(s0, x3, x2), T.Select(s0, x1, x0)))
        second = T.meta_var(T.Select(s3, T.Select(s2, x3, x2), T.Select(s2, x1, x0)))
        pair = T.meta_var(_wide(v[r, T.ramp(go * 2 * VEC, 1, 2 * VEC)], VDT, 2 * VEC))
        acc[c, T.ramp(0, 1, VEC)] = acc[c, T.ramp(0, 1, VEC)] + \
            T.Shuffle([pair], list(range(0, 2 * VEC, 2))) * first + \
            T.Shuffle([pair], list(range(1, 2 * VEC, 2))) * second

    @T.prim_func
    def gemv(xq_h: T.handle, v_h: T.handle, m_h: T.handle, b_h: T.handle, b0: T.int32,
             b1: T.int32, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        OUT = T.int32()
        xq = T.match_buffer(xq_h, (4, G), DT, align=4)
        v = T.match_buffer(v_h, (OUT, 2 * G), VDT, align=_align(VDT))
        meta = T.match_buffer(m_h, (OUT, G // 2), "uint8", align=1)
        b = T.match_buffer(b_h, (OUT,), DT, align=4)
        y = T.match_buffer(y_h, (1, OUT), DT, align=4)
        for part in loop(P):
            for r in range(b0 + (b1 - b0) * part // P, b0 + (b1 - b0) * (part + 1) // P):
                acc = T.decl_buffer((CHAINS, VEC), DT, scope="global")
                for c in T.unroll(CHAINS):
                    acc[c, T.ramp(0, 1, VEC)] = T.broadcast(T.cast(0, DT), VEC)
                for bo in range(NB // CHAINS):
                    for c in T.unroll(CHAINS):
                        step(acc, c, xq, v, meta, r, bo * CHAINS + c)
                for go in range(NB // CHAINS * CHAINS, NB):
                    step(acc, 0, xq, v, meta, r, go)
                _nm_epilogue(acc, y, b, r, BIAS)

    return gemv


def nm_gemv_avx(key: KernelKey):
    """2:4 along K for one token, with AVX's in-lane variable permute. A prologue copies the input ``x [1, in]``
    to a stack buffer with each block of 4 groups stored as (g, g+2, g+1, g+3), so one 8-float load holds two
    groups in its two 128-bit halves; ``vpermilps`` picks each value's input by the low 2 bits of its control
    lane, and the control for 8 values is one 16-bit metadata load shifted per lane (the bits above are ignored
    by the instruction). Two permutes and a blend give 8 products with no wasted lane."""
    VDT, BIAS = key.dtype, key.bias
    DT = "float32"
    G = key.k           # groups of 4 along K; a multiple of 4
    NB = G // 4
    loop, P = key.loop(), key.parts()

    @T.macro
    def product(acc, c, xp, v, r, blk, ctrl):
        first = T.meta_var(T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx.vpermilvar.ps.256", xp[T.ramp(blk * 16, 1, VEC)],
                                        ctrl))
        second = T.meta_var(T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx.vpermilvar.ps.256",
                                         xp[T.ramp(blk * 16 + 8, 1, VEC)], ctrl))
        picked = T.meta_var(T.Shuffle([first, second], [0, 1, 10, 11, 4, 5, 14, 15]))
        acc[c, T.ramp(0, 1, VEC)] = acc[c, T.ramp(0, 1, VEC)] + _wide(v[r, T.ramp(blk * VEC, 1, VEC)], VDT, VEC) * picked

    @T.macro
    def step(acc, c, xp, v, meta, r, blk):
        bits = T.meta_var(T.Cast("uint32", T.reinterpret("uint16", meta[r, T.ramp(blk * 2, 1, 2)])))
        product(acc, c, xp, v, r, blk,
                T.reinterpret("int32x8", T.shift_right(T.broadcast(bits, VEC), T.ramp(T.uint32(0), T.uint32(2), VEC))))

    @T.macro
    def step2(acc, c, xp, v, meta, r, pair):
        # One 32-bit metadata load controls two blocks: the second block's positions are the upper 16 bits.
        bits = T.meta_var(T.broadcast(T.reinterpret("uint32", meta[r, T.ramp(pair * 4, 1, 4)]), VEC))
        product(acc, c, xp, v, r, 2 * pair,
                T.reinterpret("int32x8", T.shift_right(bits, T.ramp(T.uint32(0), T.uint32(2), VEC))))
        product(acc, c, xp, v, r, 2 * pair + 1,
                T.reinterpret("int32x8", T.shift_right(bits, T.ramp(T.uint32(16), T.uint32(2), VEC))))

    @T.prim_func
    def gemv(x_h: T.handle, v_h: T.handle, m_h: T.handle, b_h: T.handle, b0: T.int32,
             b1: T.int32, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        OUT = T.int32()
        x = T.match_buffer(x_h, (1, 4 * G), DT, align=4)
        v = T.match_buffer(v_h, (OUT, 2 * G), VDT, align=_align(VDT))
        meta = T.match_buffer(m_h, (OUT, G // 2), "uint8", align=1)
        b = T.match_buffer(b_h, (OUT,), DT, align=4)
        y = T.match_buffer(y_h, (1, OUT), DT, align=4)
        xp = T.decl_buffer((4 * G,), DT, scope="global")
        for blk in range(NB):
            for h in T.unroll(4):
                for e in T.vectorized(4):
                    xp[blk * 16 + h * 4 + e] = x[0, blk * 16 + (h % 2 * 2 + h // 2) * 4 + e]
        for part in loop(P):
            for r in range(b0 + (b1 - b0) * part // P, b0 + (b1 - b0) * (part + 1) // P):
                acc = T.decl_buffer((CHAINS, VEC), DT, scope="global")
                for c in T.unroll(CHAINS):
                    acc[c, T.ramp(0, 1, VEC)] = T.broadcast(T.cast(0, DT), VEC)
                for bo in range(NB // (2 * CHAINS)):
                    for c in T.unroll(CHAINS):
                        step2(acc, c, xp, v, meta, r, bo * CHAINS + c)
                for blk in range(NB // (2 * CHAINS) * 2 * CHAINS, NB):
                    step(acc, 0, xp, v, meta, r, blk)
                _nm_epilogue(acc, y, b, r, BIAS)

    return gemv


def _transposed8(rows: list) -> list:
    """The 8 columns of an 8x8 block given as its 8 row vectors: pairs interleaved, then 64-bit pairs, then
    128-bit halves (unpcklps/unpckhps, shufps, vperm2f128 on AVX)."""
    pairs = []
    for p in range(4):
        pairs.append(T.Shuffle([rows[2 * p], rows[2 * p + 1]], [0, 8, 1, 9, 4, 12, 5, 13]))
        pairs.append(T.Shuffle([rows[2 * p], rows[2 * p + 1]], [2, 10, 3, 11, 6, 14, 7, 15]))
    quads = []
    for p in range(2):
        lo0, hi0, lo1, hi1 = pairs[4 * p:4 * p + 4]
        for a, b in ((lo0, lo1), (hi0, hi1)):
            quads.append(T.Shuffle([a, b], [0, 1, 8, 9, 4, 5, 12, 13]))
            quads.append(T.Shuffle([a, b], [2, 3, 10, 11, 6, 7, 14, 15]))
    return ([T.Shuffle([quads[j], quads[4 + j]], [0, 1, 2, 3, 8, 9, 10, 11]) for j in range(4)]
            + [T.Shuffle([quads[j], quads[4 + j]], [4, 5, 6, 7, 12, 13, 14, 15]) for j in range(4)])


def transpose(key: KernelKey):
    """``b = a.T`` for ``a [M, N]``. The inner block loop walks the longer side (measured: the other order
    is 1.6-1.8x slower on ViT's 197 x 768..3072 shapes); edges that do not fill a block are copied scalar."""
    DT = key.dtype
    loop, P = key.loop(), key.parts()

    @T.macro
    def block(a, b, ib, jb):
        blk = T.decl_buffer((VEC, VEC), DT, scope="global")
        for i in T.unroll(VEC):
            blk[i, T.ramp(0, 1, VEC)] = a[ib * VEC + i, T.ramp(jb * VEC, 1, VEC)]
        cols = T.meta_var(_transposed8([blk[i, T.ramp(0, 1, VEC)] for i in range(VEC)]))
        b[jb * VEC + 0, T.ramp(ib * VEC, 1, VEC)] = cols[0]
        b[jb * VEC + 1, T.ramp(ib * VEC, 1, VEC)] = cols[1]
        b[jb * VEC + 2, T.ramp(ib * VEC, 1, VEC)] = cols[2]
        b[jb * VEC + 3, T.ramp(ib * VEC, 1, VEC)] = cols[3]
        b[jb * VEC + 4, T.ramp(ib * VEC, 1, VEC)] = cols[4]
        b[jb * VEC + 5, T.ramp(ib * VEC, 1, VEC)] = cols[5]
        b[jb * VEC + 6, T.ramp(ib * VEC, 1, VEC)] = cols[6]
        b[jb * VEC + 7, T.ramp(ib * VEC, 1, VEC)] = cols[7]

    @T.prim_func
    def transpose_(a_h: T.handle, b0: T.int32, b1: T.int32, b_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int32()
        N = T.int32()
        a = T.match_buffer(a_h, (M, N), DT, align=4)
        b = T.match_buffer(b_h, (N, M), DT, align=4)
        if M < N:
            for part in loop(P):
                for ib in range(b0 + (b1 - b0) * part // P, b0 + (b1 - b0) * (part + 1) // P):
                    for jb in range(N // VEC):
                        block(a, b, ib, jb)
        else:
            for part in loop(P):
                for jb in range(b0 + (b1 - b0) * part // P, b0 + (b1 - b0) * (part + 1) // P):
                    for ib in range(M // VEC):
                        block(a, b, ib, jb)
        if b0 == 0:
            for i in range(M // VEC * VEC, M):
                for j in range(N):
                    b[j, i] = a[i, j]
            for i in range(M // VEC * VEC):
                for j in range(N // VEC * VEC, N):
                    b[j, i] = a[i, j]

    return transpose_


def _transposed(rows: list, lanes: int) -> list:
    """The columns of a ``lanes x lanes`` block given as its row vectors: log2(lanes) steps, each swapping the
    off-diagonal ``h x h`` sub-blocks of every ``2h x 2h`` block with two two-source shuffles per row pair
    (``vpermt2ps`` / ``vshufps`` / ``vunpck*`` on x86): ``lanes * log2(lanes)`` shuffles, a quarter per float
    at 16 lanes."""
    rows = list(rows)
    h = lanes // 2
    while h >= 1:
        lo_idx = [j if not j & h else lanes + j - h for j in range(lanes)]
        hi_idx = [j + h if not j & h else lanes + j for j in range(lanes)]
        for i in range(lanes):
            if not i & h:
                a, b = rows[i], rows[i + h]
                rows[i], rows[i + h] = T.Shuffle([a, b], lo_idx), T.Shuffle([a, b], hi_idx)
        h //= 2
    return rows


@T.macro
def _transpose_block(lo, hi, rows, L):
    # ``lo`` / ``hi`` (flat, L*L/2 each): the first and last L/2 columns of the L x L block whose rows are
    # ``rows``, through registers (`_transposed`). Two halves, not one L*L buffer: TVM puts a local buffer of
    # 1 KiB or more on its heap workspace, where LLVM cannot keep it in registers; under 1 KiB it is a stack slot
    # that vanishes into registers.
    cols = T.meta_var(_transposed(rows, L))
    lo[T.ramp(0, 1, L * L // 2)] = T.Shuffle(cols, list(range(L * L // 2)))
    hi[T.ramp(0, 1, L * L // 2)] = T.Shuffle(cols, list(range(L * L // 2, L * L)))



@T.macro
def _store_transposed(b, top, bottom, ib, jb, L, DT):
    # The ``L x L`` block whose rows are ``top``'s and then ``bottom``'s (``L / 2`` rows each), transposed in
    # registers (`_transpose_block`) and stored as rows ``jb * L ...`` of ``b``, columns ``ib * L ...``.
    lo = T.decl_buffer((L * L // 2,), DT, scope="global")
    hi = T.decl_buffer((L * L // 2,), DT, scope="global")
    _transpose_block(lo, hi, [top[i, T.ramp(0, 1, L)] for i in range(L // 2)]
                     + [bottom[i, T.ramp(0, 1, L)] for i in range(L // 2)], L)
    for c in T.unroll(L // 2):
        b[jb * L + c, T.ramp(ib * L, 1, L)] = lo[T.ramp(c * L, 1, L)]
        b[jb * L + L // 2 + c, T.ramp(ib * L, 1, L)] = hi[T.ramp(c * L, 1, L)]

def pack(key: KernelKey):
    """``x [M, N]`` (tokens x features) to ``xt [N, MP]`` (features x padded tokens), columns from ``M`` on
    zero: the tiled kernel's float32 input (``x`` in ``key.io``: an fp16 ``x`` is widened on the way). Blocks of
    ``lanes x lanes`` (with 16 lanes every load and store is a whole cache line), the transposed block written
    through a local buffer (TVMScript stores take no Python list index). The block range is over feature
    blocks; features past the last whole block are copied by the call with ``b0 == 0``."""
    DT, L, IO = key.dtype, key.lanes, key.io

    @T.macro
    def block(a, b, M, ib, jb):
        # The block's rows in two halves (each under TVM's 1 KiB stack limit, see `_transpose_block`); rows past
        # the tokens are zeros.
        top = T.decl_buffer((L // 2, L), DT, scope="global")
        bottom = T.decl_buffer((L // 2, L), DT, scope="global")
        for i in T.unroll(L // 2):
            if ib * L + i < M:
                top[i, T.ramp(0, 1, L)] = _wide(a[ib * L + i, T.ramp(jb * L, 1, L)], IO, L)
            else:
                top[i, T.ramp(0, 1, L)] = T.broadcast(T.cast(0, DT), L)
            if ib * L + L // 2 + i < M:
                bottom[i, T.ramp(0, 1, L)] = _wide(a[ib * L + L // 2 + i, T.ramp(jb * L, 1, L)], IO, L)
            else:
                bottom[i, T.ramp(0, 1, L)] = T.broadcast(T.cast(0, DT), L)
        _store_transposed(b, top, bottom, ib, jb, L, DT)

    @T.prim_func
    def pack_(a_h: T.handle, b0: T.int32, b1: T.int32, b_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int32()
        N = T.int32()
        MP = T.int32()
        a = T.match_buffer(a_h, (M, N), IO, align=_align(IO))
        b = T.match_buffer(b_h, (N, MP), DT, align=4)
        for ib in range(MP // L):
            for jb in range(b0, b1):
                block(a, b, M, ib, jb)
        if b0 == 0:
            for j in range(N // L * L, N):
                for i in range(MP):
                    b[j, i] = _wide(a[T.min(i, M - 1), j], IO) if i < M else T.cast(0, DT)

    return pack_


def pack16(key: KernelKey):
    """``x [M, N]`` (tokens x features, bf16 read as int16) to ``xt [N, MP / 2]`` 32-bit words, each two tokens
    of a feature in the `SPLIT_DTYPE` layout (tokens from ``M`` on zero): the tiled kernel's bf16 input, half
    the bytes of a float32 one and no widening pass before it. Per block of ``2 * lanes`` tokens x ``lanes``
    features, the words of each token pair (zero-extended, the second token shifted into the high half) are
    the rows of a ``lanes x lanes`` block of 32-bit words, transposed in registers as in `pack`. The block
    range is over feature blocks; features past the last whole block are done by the call with ``b0 == 0``."""
    L = key.lanes
    assert key.io == SPLIT_DTYPE, key.io

    def wide(v, lanes: int = L):
        return T.Cast("int32" if lanes == 1 else f"int32x{lanes}",
                      T.reinterpret("uint16" if lanes == 1 else f"uint16x{lanes}", v))

    @T.macro
    def fill(buf, i, a, M, t0, t1, jb):
        if t1 < M:
            buf[i, T.ramp(0, 1, L)] = T.bitwise_or(wide(a[t0, T.ramp(jb * L, 1, L)]), T.shift_left(
                wide(a[t1, T.ramp(jb * L, 1, L)]), T.broadcast(T.int32(16), L)))
        else:
            if t0 < M:
                buf[i, T.ramp(0, 1, L)] = wide(a[t0, T.ramp(jb * L, 1, L)])
            else:
                buf[i, T.ramp(0, 1, L)] = T.broadcast(T.int32(0), L)

    @T.macro
    def block(a, b, M, ib, jb):
        top = T.decl_buffer((L // 2, L), "int32", scope="global")
        bottom = T.decl_buffer((L // 2, L), "int32", scope="global")
        for i in T.unroll(L // 2):
            # word i of the block: token i in its low half, token i + L in its high half
            fill(top, i, a, M, ib * 2 * L + i, ib * 2 * L + L + i, jb)
            fill(bottom, i, a, M, ib * 2 * L + L // 2 + i, ib * 2 * L + L + L // 2 + i, jb)
        _store_transposed(b, top, bottom, ib, jb, L, "int32")

    @T.prim_func
    def pack16_(a_h: T.handle, b0: T.int32, b1: T.int32, b_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int32()
        N = T.int32()
        MW = T.int32()
        a = T.match_buffer(a_h, (M, N), "int16", align=2)
        b = T.match_buffer(b_h, (N, MW), "int32", align=4)
        for ib in range(MW // L):
            for jb in range(b0, b1):
                block(a, b, M, ib, jb)
        if b0 == 0:
            for j in range(N // L * L, N):
                for w in range(MW):
                    lo = T.meta_var(w // L * 2 * L + w % L)      # the word's two tokens
                    hi = T.meta_var(lo + L)
                    b[j, w] = T.bitwise_or(
                        T.if_then_else(lo < M, wide(a[T.min(lo, M - 1), j], 1), 0),
                        T.shift_left(T.if_then_else(hi < M, wide(a[T.min(hi, M - 1), j], 1), 0), 16))

    return pack16_


def unpack(key: KernelKey):
    """``y [N, MP]`` (features x padded tokens) to ``out [M, N]``: the first ``M`` tokens, transposed back in
    ``lanes x lanes`` blocks, stored in ``key.io`` (a bf16 / fp16 layer's output rounded here, not in a pass of
    its own). The block range is over feature blocks, as in `pack`."""
    DT, L, IO = key.dtype, key.lanes, key.io

    @T.macro
    def block(a, b, M, ib, jb):
        lo = T.decl_buffer((L * L // 2,), DT, scope="global")
        hi = T.decl_buffer((L * L // 2,), DT, scope="global")
        _transpose_block(lo, hi, [a[jb * L + i, T.ramp(ib * L, 1, L)] for i in range(L)], L)
        for c in T.unroll(L // 2):
            if ib * L + c < M:
                b[ib * L + c, T.ramp(jb * L, 1, L)] = _narrow(lo[T.ramp(c * L, 1, L)], IO, L)
            if ib * L + L // 2 + c < M:
                b[ib * L + L // 2 + c, T.ramp(jb * L, 1, L)] = _narrow(hi[T.ramp(c * L, 1, L)], IO, L)

    @T.prim_func
    def unpack_(a_h: T.handle, b0: T.int32, b1: T.int32, b_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int32()
        N = T.int32()
        MP = T.int32()
        a = T.match_buffer(a_h, (N, MP), DT, align=4)
        b = T.match_buffer(b_h, (M, N), IO, align=_align(IO))
        for ib in range((M + L - 1) // L):
            for jb in range(b0, b1):
                block(a, b, M, ib, jb)
        if b0 == 0:
            for j in range(N // L * L, N):
                for i in range(M):
                    b[i, j] = _narrow(a[j, i], IO)

    return unpack_
