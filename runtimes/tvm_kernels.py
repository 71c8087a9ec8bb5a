"""TensorIR kernels for the TVM runtime, written in TVMScript and specialised on what shapes the code:
the fan-in ``k``, the token count and the index dtype. Row counts and feature sizes stay symbolic, so one
compiled kernel serves every layer with the same ``k``.

Buffers are declared with ``offset_factor=1`` and element alignment: kernels never assume 64-byte aligned
data, so a misaligned view cannot make them fault.

- `fanin_gemv` — few tokens: each live row accumulates 8 products at a time (values and indices contiguous,
  inputs gathered), then reduces horizontally. Best when there is no token dimension to vectorise over.
- `fanin_spmm` — many tokens (ViT's 197, a convolution's H*W pixels): inputs transposed to ``[in, tokens]`` so
  each index selects a contiguous row; 4 rows x 16 tokens of accumulators stay in registers while the
  fan-in streams by. The output is ``[out, tokens]``: NCHW for a convolution; a Linear transposes it back
  (cheaper than strided stores from the kernel).
Ablated rows are never computed: live row ``r`` writes output row ``orow[r]``, ablated rows get their bias.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

VEC = 8            # fp32 lanes of one AVX2 register; LLVM splits or widens for other targets
ROWS = 4           # rows per register block in the token kernel
TOKENS = 16        # tokens per register block in the token kernel


@dataclass(frozen=True)
class KernelKey:
    """Everything a compiled kernel is specialised on; part of the on-disk cache key."""

    kind: str          # "gemv" | "spmm"
    k: int
    tokens: int
    index_dtype: str
    dtype: str
    bias: bool

    def name(self) -> str:
        return f"sparsecc_{self.kind}_k{self.k}_t{self.tokens}_{self.index_dtype}_{self.dtype}_{'b' if self.bias else 'nb'}"


def build(key: KernelKey):
    """The PrimFunc for ``key`` (not yet compiled)."""
    builder = {"gemv": fanin_gemv, "spmm": fanin_spmm}[key.kind]
    return builder(key).with_attr("global_symbol", key.name())


def fanin_gemv(key: KernelKey):
    """One token: ``x [1, in]`` (callers loop over a few tokens)."""
    K, IDX, DT, BIAS = key.k, key.index_dtype, key.dtype, key.bias
    KV = K // VEC * VEC

    @T.prim_func
    def gemv(x_h: T.handle, v_h: T.handle, i_h: T.handle, orow_h: T.handle, arow_h: T.handle, b_h: T.handle,
             y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int32()
        A = T.int32()
        IN = T.int32()
        OUT = T.int32()
        x = T.match_buffer(x_h, (1, IN), DT, offset_factor=1, align=4)
        v = T.match_buffer(v_h, (R, K), DT, offset_factor=1, align=4)
        idx = T.match_buffer(i_h, (R, K), IDX, offset_factor=1, align=2)
        orow = T.match_buffer(orow_h, (R,), "int32", offset_factor=1, align=4)
        arow = T.match_buffer(arow_h, (A,), "int32", offset_factor=1, align=4)
        b = T.match_buffer(b_h, (OUT,), DT, offset_factor=1, align=4)
        y = T.match_buffer(y_h, (1, OUT), DT, offset_factor=1, align=4)
        for r in range(R):
            acc = T.decl_buffer((VEC,), DT, scope="local")
            tail = T.decl_buffer((1,), DT, scope="local")
            for l in T.vectorized(VEC):
                acc[l] = T.cast(0, DT)
            tail[0] = T.cast(0, DT)
            for jo in range(KV // VEC):
                # The gathered inputs are assembled lane by lane from scalar index loads: a vector index load
                # would be extracted lane by lane, competing with the inserts for the shuffle ports.
                acc[T.ramp(0, 1, VEC)] = acc[T.ramp(0, 1, VEC)] + v[r, T.ramp(jo * VEC, 1, VEC)] * T.Shuffle(
                    [x[0, T.Cast("int32", idx[r, jo * VEC + l])] for l in range(VEC)], list(range(VEC)))
            for j in range(KV, K):
                tail[0] = tail[0] + v[r, j] * x[0, T.Cast("int32", idx[r, j])]
            total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail[0]
            if BIAS:
                y[0, orow[r]] = total + b[orow[r]]
            else:
                y[0, orow[r]] = total
        for a in range(A):
            if BIAS:
                y[0, arow[a]] = b[arow[a]]
            else:
                y[0, arow[a]] = T.cast(0, DT)

    return gemv


def fanin_spmm(key: KernelKey):
    K, NT, IDX, DT, BIAS = key.k, key.tokens, key.index_dtype, key.dtype, key.bias
    NTB = NT // TOKENS
    TAIL = NT - NTB * TOKENS

    @T.prim_func
    def spmm(xt_h: T.handle, v_h: T.handle, i_h: T.handle, orow_h: T.handle, arow_h: T.handle, b_h: T.handle,
             y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int32()
        A = T.int32()
        IN = T.int32()
        OUT = T.int32()
        xt = T.match_buffer(xt_h, (IN, NT), DT, offset_factor=1, align=4)
        v = T.match_buffer(v_h, (R, K), DT, offset_factor=1, align=4)
        idx = T.match_buffer(i_h, (R, K), IDX, offset_factor=1, align=2)
        orow = T.match_buffer(orow_h, (R,), "int32", offset_factor=1, align=4)
        arow = T.match_buffer(arow_h, (A,), "int32", offset_factor=1, align=4)
        b = T.match_buffer(b_h, (OUT,), DT, offset_factor=1, align=4)
        y = T.match_buffer(y_h, (OUT, NT), DT, offset_factor=1, align=4)
        for tb in range(NTB):
            for rb in range(R // ROWS):
                acc = T.decl_buffer((ROWS, TOKENS), DT, scope="local")
                for q in T.unroll(ROWS):
                    for t in T.vectorized(TOKENS):
                        acc[q, t] = T.cast(0, DT)
                for j in range(K):
                    for q in T.unroll(ROWS):
                        for t in T.vectorized(TOKENS):
                            acc[q, t] = acc[q, t] + v[rb * ROWS + q, j] * \
                                xt[T.Cast("int32", idx[rb * ROWS + q, j]), tb * TOKENS + t]
                for q in T.unroll(ROWS):
                    for t in T.vectorized(TOKENS):
                        y[orow[rb * ROWS + q], tb * TOKENS + t] = acc[q, t] + (
                            b[orow[rb * ROWS + q]] if BIAS else T.cast(0, DT))
            for r in range(R // ROWS * ROWS, R):
                acc1 = T.decl_buffer((TOKENS,), DT, scope="local")
                for t in T.vectorized(TOKENS):
                    acc1[t] = T.cast(0, DT)
                for j in range(K):
                    for t in T.vectorized(TOKENS):
                        acc1[t] = acc1[t] + v[r, j] * xt[T.Cast("int32", idx[r, j]), tb * TOKENS + t]
                for t in T.vectorized(TOKENS):
                    y[orow[r], tb * TOKENS + t] = acc1[t] + (b[orow[r]] if BIAS else T.cast(0, DT))
        if TAIL > 0:
            for r in range(R):
                acct = T.decl_buffer((TAIL,), DT, scope="local")
                for t in T.vectorized(TAIL):
                    acct[t] = T.cast(0, DT)
                for j in range(K):
                    for t in T.vectorized(TAIL):
                        acct[t] = acct[t] + v[r, j] * xt[T.Cast("int32", idx[r, j]), NTB * TOKENS + t]
                for t in T.vectorized(TAIL):
                    y[orow[r], NTB * TOKENS + t] = acct[t] + (b[orow[r]] if BIAS else T.cast(0, DT))
        for a in range(A):
            for t in range(NT):
                y[arow[a], t] = b[arow[a]] if BIAS else T.cast(0, DT)

    return spmm
