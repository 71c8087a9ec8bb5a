"""TVM runtime: condensed ops as TensorIR kernels compiled by LLVM for this CPU (`kernels`), cached on
disk (`cache`), called on torch tensors without copies where the layout allows.

Per call it picks the kernel by token count: one token at a time below `SPMM_MIN_TOKENS` (gather-bound GEMV), the tiled
token kernel above (vectorised over tokens, its register tile measured per layer shape on this machine among
`kernels.TILES`), or the layer's dense op where `tuning` measured it faster. Inputs are guarded: the layer's dtype
(float32, bf16 or fp16), any strides or alignment (copied to a contiguous tensor when needed; kernels assume element
alignment only). Each kernel
call is split into row blocks over PyTorch's own threads (`parallel`), as many as ``torch.get_num_threads()`` says at
that call; concurrent callers share compiled kernels read-only."""

from __future__ import annotations

import functools
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.core import formats, ops, patterns as _patterns
from sparsecc.core.errors import InputError
from sparsecc.runtimes import cpu, dense as _dense, tuning
from sparsecc.runtimes.tvm import parallel

NAME = "tvm"
#: Values are kept in the layer's dtype; the kernels compute in float32 (bf16 / fp16 inputs are widened on the
#: way in, outputs narrowed on the way out), and the dense op they are measured against runs in the layer's dtype.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The 16-bit dtypes whose one-token kernels read and write them in place of float32.
HALF = DTYPES[1:]
#: Ops whose bound kernels chain (`BoundLinear.chain`): fc1 -> activation -> fc2 with the intermediate tokens-last.
CHAINS = ("condensed_linear",)
#: From this many tokens on, the token kernel beats one GEMV per token (3072->768 at 90%, 1 thread: one GEMV
#: per token 193 / 400 / 835 us at 2 / 4 / 8 tokens, the token kernel 211 / 224 / 285 us).
SPMM_MIN_TOKENS = 3


def linear_kernel(tokens: int) -> str:
    """The kernel a fan-in Linear of a TVM library (`export_tvm`) runs at ``tokens`` tokens: one GEMV per token
    below `SPMM_MIN_TOKENS`, else the K-blocked token kernel. The eager runtime runs the tiled kernel there."""
    return "gemv" if tokens < SPMM_MIN_TOKENS else "spmm_kb"


@functools.cache
def expands() -> bool:
    """Whether this CPU expands 16-bit lanes in one instruction (AVX512_VBMI2's ``vpexpandw``): the bit-mask
    one-token kernel for bf16 layers (`kernels.mask_gemv`) is offered only then (elsewhere LLVM would
    emulate the expanding load lane by lane)."""
    from tvm.target import codegen

    return bool(codegen.target_has_features("avx512vbmi2", kernel_cache().target))


def _label(form) -> str:
    """A sparse kernel form's name in the tuning cache: a register tile's, or the one-token form's own."""
    return form if isinstance(form, str) else form.name()


@functools.cache
def lanes() -> int:
    """The tiled kernels' vector width on this machine (16 with AVX-512, else 8). Cached: asking the target
    costs about 200 us, as much as a small layer."""
    from sparsecc.runtimes.tvm import kernels as tvm_kernels

    return tvm_kernels.lanes(kernel_cache().target)


_state_lock = threading.Lock()
_cache = None
_tuning = None


def unavailable() -> Optional[str]:
    try:
        import tvm  # noqa: F401
        from tvm.script import tirx  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the runtime is missing
        return f"apache-tvm is not importable ({type(exc).__name__}: {exc}); pip install apache-tvm==0.27.0.post1"
    return None


def kernel_cache():
    """The process-wide kernel cache for the host CPU target."""
    global _cache
    with _state_lock:
        if _cache is None:
            import tvm

            from sparsecc.runtimes.tvm import cache as kc, kernels as tvm_kernels

            target = tvm.target.Target.from_device("cpu")
            _cache = kc.KernelCache(target, (Path(tvm_kernels.__file__),), cpu=cpu.identity())
        return _cache


def forget_caches() -> None:
    """Drop this process's kernel and tuning caches: the next use reopens them from ``$SPARSECC_CACHE_DIR`` (what
    a new process does; the benchmark times cold and warm compiles with it)."""
    global _cache, _tuning
    with _state_lock:
        _cache = _tuning = None
    _layout_kernel.cache_clear()
    lanes.cache_clear()
    expands.cache_clear()


def tuning_cache() -> tuning.TuningCache:
    """The process-wide sparse-or-dense choices, keyed like the kernels plus torch's version (dense ops)."""
    global _tuning
    if _tuning is None:
        from sparsecc.core.files import cache_root

        fingerprint = {**kernel_cache().fingerprint, "torch": torch.__version__}
        _tuning = tuning.TuningCache(fingerprint, cache_root() / "tuning")
    return _tuning


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kernel(kind: str, k: int, tokens: int, index_dtype: torch.dtype, bias: bool, tile=None,
            dtype: torch.dtype = torch.float32, io: torch.dtype = torch.float32) -> Callable:
    """The compiled kernel of ``kind``; ``dtype`` is its values' dtype, ``io`` its input's and output's (float32
    but for the one-token kernels of bf16 / fp16 layers)."""
    import tvm

    from sparsecc.runtimes.tvm import kernels as tvm_kernels

    key = tvm_kernels.KernelKey(kind, k, tokens, _name(index_dtype), _name(dtype), bias,
                                tile=tile, lanes=lanes() if tile is not None else tvm_kernels.VEC, io=_name(io))
    return kernel_cache().get(key.name(), lambda: tvm.IRModule({key.name(): tvm_kernels.build(key)}))


@functools.cache
def _layout_kernel(kind: str, width: int, io: torch.dtype = torch.float32) -> Callable:
    import tvm

    from sparsecc.runtimes.tvm import kernels as tvm_kernels

    key = tvm_kernels.KernelKey(kind, 0, 0, "int32", "float32", False, lanes=width, io=_name(io))
    return kernel_cache().get(key.name(), lambda: tvm.IRModule({key.name(): tvm_kernels.build(key)}))


_scratch = threading.local()


def scratch(slot: str, rows: int, cols: int) -> Tensor:
    """A float32 ``[rows, cols]`` buffer of this thread's, for an intermediate that never leaves the call that
    asks for it (the tiled kernel's transposed input and output). Fresh megabyte-sized tensors cost a page fault
    per 4 KiB on every call (8 us per allocation, 2 ms of a ViT-B/16 call); one buffer per slot and thread,
    grown to the largest use, costs nothing after the first call. Threads never share one."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(slot)
    if buf is None or buf.numel() < rows * cols:
        buf = buffers[slot] = torch.empty(rows * cols)
    return buf[:rows * cols].view(rows, cols)


def zeroed(slot: tuple, size: int) -> Tensor:
    """A float32 buffer of this thread's, all zeros when first made and kept for ``slot``: for inputs whose
    every call writes the same positions (a convolution's input planes inside their zero padding, columns before
    their padding tokens), so the positions never written stay zero without a fill per call (a fresh zeroed
    tensor per call was a pass over the buffer plus its page faults). One per slot and thread; inputs of ever new
    sizes (images of any size) start over after `ZEROED_SLOTS` slots rather than grow without bound."""
    buffers = _scratch.__dict__.setdefault("zeroed", {})
    key = (*slot, size)
    buf = buffers.get(key)
    if buf is None:
        if len(buffers) >= ZEROED_SLOTS:
            buffers.clear()
        buf = buffers[key] = torch.zeros(size)
    return buf


#: How many `zeroed` buffers a thread keeps (a ResNet-50 has about a dozen distinct convolution input shapes).
ZEROED_SLOTS = 64


def to_tokens_last(x: Tensor, width: int) -> Tensor:
    """``[tokens, in]`` (contiguous) to the tiled kernel's ``[in, tokens_padded]``, padding columns zero, in
    this thread's scratch buffer. A bf16 ``x`` stays 16-bit (`tokens_padded` then a multiple of two vectors):
    ``[in, tokens_padded / 2]`` 32-bit words in the `kernels.SPLIT_DTYPE` layout; an fp16 one is widened to
    float32 in the same pass."""
    from sparsecc.runtimes.tvm.kernels import padded

    tokens, n = x.shape
    if x.dtype == torch.bfloat16:
        xt = scratch("tokens_last_in16", n, padded(tokens, 2 * width) // 2).view(torch.int32)
        parallel.run(_layout_kernel("pack16", width, x.dtype), n // width, 2 * xt.numel(), x.view(torch.int16), xt)
        return xt
    xt = scratch("tokens_last_in", n, padded(tokens, width))
    # A moved float costs about what a multiply-add does: its element count is its work.
    parallel.run(_layout_kernel("pack", width, x.dtype), n // width, xt.numel(), x, xt)
    return xt


def padded_tokens(xt: Tensor) -> int:
    """The padded token count of a `to_tokens_last` result (a bf16 one holds two tokens per 32-bit word)."""
    return xt.shape[1] * (2 if xt.dtype == torch.int32 else 1)


def from_tokens_last(y: Tensor, tokens: int, dtype: torch.dtype = torch.float32,
                     shape: Optional[tuple[int, ...]] = None) -> Tensor:
    """The first ``tokens`` columns of the tiled kernel's ``[out, tokens_padded]`` as ``[tokens, out]`` in
    ``dtype`` (rounded from float32 in the same pass), allocated in ``shape`` (``[..., out]``, as many tokens)
    where given: the layer's answer as a tensor of its own, not a view of a 2-D one."""
    out = y.new_empty(shape or (tokens, y.shape[0]), dtype=dtype)
    width = lanes()
    parallel.run(_layout_kernel("unpack", width, dtype), y.shape[0] // width, out.numel(), y,
                 out.view(tokens, y.shape[0]))
    return out


def _contiguous(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` as the layer takes it: on the CPU, in the layer's dtype, contiguous."""
    if x.dtype != dtype:
        raise InputError(f"tvm runtime: input is {x.dtype} but the layer's weights are {dtype}; cast the input "
                         f"(or the model) so that they match, as torch's own layer would require")
    if not x.is_cpu:
        raise InputError(f"tvm runtime: input is on {x.device}; its kernels run on the CPU")
    # Kernels assume element alignment only (any float32 view has it); contiguity is what they need.
    return x if x.is_contiguous() else x.contiguous()


def _constant(x: Tensor, bias: Optional[Tensor], shape: tuple[int, ...], channel_dim: int) -> Tensor:
    """The output of a layer whose every row is ablated: its bias (or zeros) broadcast, in fresh memory (a view
    of the bias would let callers write into it, and custom ops may not alias their inputs)."""
    if bias is None:
        return x.new_zeros(shape)
    view = [1] * len(shape)
    view[channel_dim] = -1
    return bias.view(view).expand(shape).clone(memory_format=torch.contiguous_format)


#: The TVM runtime's dense form of a bf16 / fp16 Linear at one token (`kernels.dense_gemv`).
GEMV16 = "tvm_gemv"


class _LinearForms(_dense.LinearForms):
    """torch's forms of a Linear, and for a one-token call of a bf16 / fp16 layer this runtime's dense GEMV
    (`GEMV16`): torch's 16-bit GEMV converts as it goes on CPUs without AVX512_BF16 / AVX512_FP16 and ran at
    a third of that kernel's speed there (AMD EPYC Zen 3, 1 thread, 768-2048 wide: 2.6-3.0x), so a decode step's
    layers that stay dense, and the dense op the sparse kernels are measured against, were slower than they
    need be. It is one more measured candidate (`tuning.choose_tile`), so a CPU where torch's is faster (AMX)
    keeps torch's; it reads the plain form's decoded weight (no copy) and sums in float32."""

    def candidates(self, x: Tensor, tokens: int) -> tuple[str, ...]:
        found = super().candidates(x, tokens)
        return (*found, GEMV16) if tokens == 1 and x.shape[-1] > 0 and x.dtype in HALF else found

    def _packed(self, name: str, weight: Tensor, x: Tensor) -> Callable[[Tensor], Tensor]:
        if name != GEMV16:
            return super()._packed(name, weight, x)
        return _dense_gemv(weight, self.bias)


def _dense_gemv(weight: Tensor, bias: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    """``F.linear`` at one token by `kernels.dense_gemv` on ``weight`` (the layer's dtype; inputs and outputs in
    it too, as a call's are: `_Tuned.__call__` makes them contiguous and checks the dtype)."""
    import tvm_ffi

    from sparsecc.runtimes.tvm.kernels import DENSE_ROWS

    out, n = weight.shape
    weight = weight.contiguous()
    wide_bias = bias.float().contiguous() if bias is not None else torch.zeros(out)
    kernel = _kernel("dense_gemv", 0, 1, torch.int32, bias is not None, dtype=weight.dtype, io=weight.dtype)
    args = (tvm_ffi.from_dlpack(weight), tvm_ffi.from_dlpack(wide_bias))
    blocks = -(-out // DENSE_ROWS)

    def run(x: Tensor) -> Tensor:
        y = x.new_empty(*x.shape[:-1], out)
        parallel.run(kernel, blocks, out * n, x.view(1, n), *args, y.view(1, out))
        return y

    run.tensors = (weight, wide_bias)   # what ``args`` points into stays alive with the form
    return run


class _Tuned:
    """A bound layer that runs its sparse kernel or its dense op (on the dense weight, decoded on first use),
    whichever `tuning` measured faster for this call's token bucket and torch's thread count. ``sparse`` takes
    and returns float32 (the kernels' arithmetic); the dense op runs in the layer's dtype, so a bf16 layer on
    an AMX CPU is measured against oneDNN's bf16 GEMM, and never runs slower than it. Both sides are measured
    in their best form first: the sparse kernel's register tile among its candidates (`tiles`; ``autotune=False``
    still runs the best tile), the dense op's form among plain and packed (`sparsecc.runtimes.dense`).
    What a bucket runs is kept as one callable (``routes``): a call pays a dict lookup, no more."""

    #: Whether calls take a channels-last input as it is (convolutions: every path reads any layout and answers
    #: in the input's layout); other inputs not in torch's layout are copied into it first.
    channels_last = False

    def __init__(self, values: Tensor) -> None:
        self.values = values
        self.live = values.shape[0] > 0       # some row is not ablated
        self.tune = tuning.enabled(values)
        self.choices: dict[tuple[int, int], tuning.Choice] = {}
        self.tile_choices: dict[tuple[int, int], tuning.Choice] = {}
        self._tiles: dict[tuple[int, int], object] = {}     # the chosen tiles, parsed once
        self.routes: dict[tuple[int, int], Callable[[Tensor], Tensor]] = {}
        self._dense_forms: Optional[_dense.DenseForms] = None
        # Buckets whose choice is the sparse kernel: the dense form they measured against, a shapeless stand-in
        # for their input (forms are built from the input's shape) and when the route was settled
        # (`tuning.route_made`), for `run_dense`.
        self._measured_dense: dict[tuple[int, int], tuple[str, Tensor, int]] = {}
        self._sparse_routes: dict[tuple[int, int], Callable[[Tensor], Tensor]] = {}   # while `run_dense` holds them

    def tiles(self, x: Tensor) -> tuple:
        """The register tiles the sparse kernel of this call can take (none: it has no tile)."""
        return ()

    def native(self, x: Tensor) -> bool:
        """Whether the sparse kernel of this call takes ``x`` in its own dtype (else float32)."""
        return False

    def _kernel_input(self, x: Tensor) -> Tensor:
        return x if x.dtype == torch.float32 or self.native(x) else x.float()

    def tokens(self, x: Tensor) -> int:
        raise NotImplementedError

    def constant(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def signature(self, x: Tensor) -> tuple:
        """What the speed of both paths depends on, besides the token count and thread count."""
        raise NotImplementedError

    def dense_forms(self, x: Tensor) -> _dense.DenseForms:
        """The layer's dense op by form, built on first use from a call's input (`_make_dense_forms`)."""
        if self._dense_forms is None:
            self._dense_forms = self._make_dense_forms(x)
        return self._dense_forms

    def _make_dense_forms(self, x: Tensor) -> _dense.DenseForms:
        raise NotImplementedError

    def sparse(self, x: Tensor, tile=None) -> Tensor:
        raise NotImplementedError

    def _signature(self, x: Tensor) -> tuple:
        return (*self.signature(x), _name(self.values.dtype))

    def tile_for(self, x: Tensor, key: tuple[int, int]):
        """The measured best form of the sparse kernel for this call's token bucket and thread count: a register
        tile (many tokens), a one-token form's name (`BoundLinear.FORMS`), or None (nothing to choose). ``x``
        is the kernels' float32 input."""
        if key in self._tiles:
            return self._tiles[key]
        choice = self.tile_choices.get(key)
        if choice is None:
            tiles = self.tiles(x)
            if not tiles:
                self._tiles[key] = None
                return None
            choice = self.tile_choices[key] = tuning.choose_tile(
                tuning_cache(), self._signature(x), self.tokens(x),
                {_label(t): functools.partial(self.sparse, x, t) for t in tiles}, tuning.streaming(self.values),
                tuning.l2_cold(self.values, self.tokens(x)))
        from sparsecc.runtimes.tvm.kernels import Tile

        tile = self._tiles[key] = choice.tile if choice.tile in BoundLinear.FORMS else Tile.parse(choice.tile)
        return tile

    def _sparse(self, x: Tensor, key: tuple[int, int]) -> Tensor:
        """The sparse kernel (its measured tile) on ``x`` in the layer's dtype: widened to float32 and back
        where the kernel does not take that dtype itself (`native`)."""
        wide = self._kernel_input(x)
        y = self.sparse(wide, self.tile_for(wide, key))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        # Every call of a layer runs this, and Python between two oneDNN calls costs them more than its own
        # time (measured: 4 us of Python before a bf16 GEMM slowed it by 11 us): checks are inline, the
        # bucket's route is one lookup.
        if x.dtype != self.values.dtype or not x.is_cpu or not (
                x.is_contiguous() or self.channels_last and x.is_contiguous(memory_format=torch.channels_last)):
            x = _contiguous(x, self.values.dtype)
        if not self.live:
            return self.constant(x)
        key = (tuning.bucket(self.tokens(x)), torch.get_num_threads())
        route = self.routes.get(key)
        if route is None:
            route = self._route(x, key)
        return route(x)

    def _route(self, x: Tensor, key: tuple[int, int]) -> Callable[[Tensor], Tensor]:
        """What calls in ``key``'s bucket run, measured on this first one: the sparse kernel (its best tile), or
        the dense op's fastest form where that measured faster (``autotune=False``: the sparse kernel)."""
        sparse = functools.partial(self._sparse, key=key)
        if not self.tune:
            self.routes[key] = sparse
            return sparse
        tokens, cold = self.tokens(x), tuning.streaming(self.values)
        l2_cold = tuning.l2_cold(self.values, tokens)
        tile = self.tile_for(self._kernel_input(x), key)
        forms = self.dense_forms(x)
        names = forms.candidates(x, tokens)
        if len(names) > 1:
            form = tuning.choose_tile(
                tuning_cache(), (*self._signature(x), "dense forms"), tokens,
                {n: (lambda n=n: forms.form(n, x)(x)) for n in names}, cold, l2_cold).tile   # built in the warm-up
        else:
            form = names[0]
        # Forms are built (decoded, packed) only where they are measured or run: choices read from the cache
        # that run the sparse kernel build nothing.
        choice = self.choices[key] = tuning.choose(tuning_cache(), self._signature(x), tokens, lambda: sparse(x),
                                                   lambda: forms.form(form, x)(x), cold,
                                                   _label(tile) if tile is not None else "", dense_form=form,
                                                   l2_cold=l2_cold)
        route = self.routes[key] = forms.form(form, x) if choice.dense else sparse
        if not choice.dense:
            self._measured_dense[key] = (form, x.new_empty(x.shape, device="meta"), tuning.route_made())
        self.settle()
        return route

    def sparse_buckets(self, since: int = 0) -> list[tuple[int, int]]:
        """The buckets at torch's thread count where this layer runs its sparse kernel by measured choice,
        settled after ``since`` (`tuning.routes_made`)."""
        threads = torch.get_num_threads()
        return [key for key, (_, _, made) in self._measured_dense.items()
                if key[1] == threads and made > since and not self.choices[key].dense]

    def run_dense(self, key: tuple[int, int], dense: bool = True) -> None:
        """Run ``key``'s bucket (one `sparse_buckets` gave) on the dense op in the form it was measured against,
        or (``dense=False``) on the sparse kernel again: the whole-model check
        (`sparsecc.compiler.autotune.never_slower`) times the model both ways, then keeps the faster. The choice
        says so (``whole_model``), so the report and the chained MLP path see it; `settle` drops forms left
        unused."""
        choice = self.choices[key]
        if choice.whole_model == dense:
            return
        form, stand_in, _ = self._measured_dense[key]
        if dense:
            self._sparse_routes[key] = self.routes[key]
            self.routes[key] = self.dense_forms(stand_in).form(form, stand_in)
        else:
            self.routes[key] = self._sparse_routes.pop(key, None) or functools.partial(self._sparse, key=key)
        self.choices[key] = replace(choice, dense=dense, whole_model=dense)

    def settle(self) -> None:
        """Keep only the dense forms some bucket runs (each packed form is a copy of the weight)."""
        if self._dense_forms is not None:
            self._dense_forms.keep({c.dense_form or _dense.PLAIN for c in self.choices.values() if c.dense})


@functools.cache
def _no_windows() -> object:
    """The window table a chunked tile's kernel takes and never reads (`kernels.fanin_tiled`)."""
    import tvm_ffi

    table = torch.zeros(1, 2, dtype=torch.int32)
    return table, tvm_ffi.from_dlpack(table)


class _Bound(_Tuned):
    """One layer's constants in the form the kernels take, derived once, plus its kernels by token count."""

    def __init__(self, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor], out: int,
                 groups: int = 1, group_fan_in: int = 0) -> None:
        super().__init__(values)
        self.rows = rows
        live = torch.ones(out, dtype=torch.bool)
        if rows is not None:
            live[:] = False
            live[rows] = True
        # Value row i is output row rows[i], in whatever order the rows come (the op's contract).
        orow = torch.arange(out) if rows is None else rows.to(torch.int64)
        if groups > 1:   # one kernel over the whole unfolded input: shift each filter's indices to its group
            shift = (orow // (out // groups)) * group_fan_in
            indices = (indices.to(torch.int64) + shift[:, None]).to(torch.int32).contiguous()
        self.values, self.indices, self.out = values, indices, out
        self.orow = orow.to(torch.int32)
        self.arow = torch.nonzero(~live).flatten().to(torch.int32)
        self.has_bias = bias is not None
        # The kernels add a float32 bias; the dense op takes the layer's own.
        self.bias = bias.float().contiguous() if bias is not None else torch.zeros(out)
        self.bias_or_none = bias
        # The kernels' constant arguments as TVM tensors (sharing memory): converted once, not on every call.
        import tvm_ffi

        self.args = tuple(tvm_ffi.from_dlpack(t) for t in (self.values, self.indices, self.orow, self.arow, self.bias))
        self.kernels: dict[tuple, Callable] = {}
        # Window tables by window count, and by (tile, padded tokens) for the call path.
        self.window_tables: dict[object, tuple[Tensor, object]] = {}

    def kernel(self, kind: str, tokens: int, tile=None, io: torch.dtype = torch.float32) -> Callable:
        fn = self.kernels.get((kind, tokens, tile, io))
        if fn is None:
            from sparsecc.runtimes.tvm import kernels as tvm_kernels

            index_dtype = torch.int32 if kind in ("spmm_flat", "tiled_flat") else self.indices.dtype
            k = self.values.shape[1]
            if tile is not None and k > tvm_kernels.STATIC_K:
                k = 0                   # the tiled kernel for any fan-in (`fanin_tiled`)
            fn = self.kernels[(kind, tokens, tile, io)] = _kernel(
                kind, k, tokens, index_dtype, self.has_bias, tile.code() if tile is not None else None,
                self.values.dtype, io)
        return fn

    def window_index(self) -> Tensor:
        """Each row's indices as windows count them (`windows`): the layer's own, in its input's units."""
        return self.indices

    def window_units(self) -> int:
        """Index units per input row of the token kernel's input (a direct convolution's taps of one channel
        read the same plane: one row of the input per channel)."""
        return 1

    def windows(self, tile, tokens: int) -> object:
        """The window table of a windowed ``tile`` (`kernels.Tile.window`) at ``tokens`` (padded) tokens, as a
        TVM tensor: ``[rows, windows + 1]`` int32, row ``r``'s values in window ``w`` being ``table[r, w] ..<
        table[r, w + 1]`` (its indices are sorted). A window spans the inputs whose token-tile rows fill
        ``tile.window`` KiB, so that its inputs stay in cache (L2, where the whole input does not fit) while
        every row of the thread's share reads them."""
        found = self.window_tables.get((tile, tokens))      # every call of a windowed tile: one lookup
        if found is None:
            count = self.window_count(tile, tokens)
            found = self.window_tables.get(count)
            if found is None:
                import tvm_ffi

                index = self.window_index().to(torch.int64).contiguous()
                edges = torch.linspace(0, self._reach(), count + 1).round().to(torch.int64)   # balanced windows
                table = torch.searchsorted(index, edges.expand(index.shape[0], -1).contiguous(), side="left")
                table = table.to(torch.int32).contiguous()
                found = self.window_tables[count] = (table, tvm_ffi.from_dlpack(table))
            self.window_tables[(tile, tokens)] = found
        return found[1]

    def window_count(self, tile, tokens: int) -> int:
        """How many windows a windowed ``tile`` cuts this layer's inputs into at ``tokens`` (padded) tokens."""
        width = min(tokens, tile.vectors * lanes()) * 4
        span = max(1, tile.window * 1024 // width) * self.window_units()
        return -(-self._reach() // span)

    def _reach(self) -> int:
        found = self.__dict__.get("_reach_")
        if found is None:
            index = self.window_index()
            found = self.__dict__["_reach_"] = int(index.max()) + 1 if index.numel() else 1
        return found

    def windowed(self) -> bool:
        """Whether windowed tiles can run: they need each row's indices sorted (`formats` keeps them so)."""
        found = self.__dict__.get("_windowed")
        if found is None:
            index = self.window_index()
            found = self.__dict__["_windowed"] = bool((index[:, 1:] >= index[:, :-1]).all())
        return found

    def run(self, kind: str, tokens: int, x: Tensor, y: Tensor, args: Optional[tuple] = None, tile=None,
            io: Optional[torch.dtype] = None) -> None:
        """One kernel call, its rows split over torch's threads (row blocks for the token kernels). ``io``: the
        dtype the kernel reads ``x`` as (default ``x``'s: float32 but for native one-token calls; a bf16 / fp16
        tokens-last input comes as 32-bit words)."""
        from sparsecc.runtimes.tvm.kernels import blocks

        rows = self.values.shape[0]
        args = self.args if args is None else args
        if tile is not None:         # the tiled kernels take a window table, read by windowed tiles only
            args = (*args, self.windows(tile, tokens) if tile.window else _no_windows()[1])
        parallel.run(self.kernel(kind, tokens, tile, io or x.dtype),
                     blocks(kind, rows, tile), rows * self.values.shape[1] * tokens, x, *args, y)

    def tiles(self, x: Tensor) -> tuple:
        from sparsecc.runtimes.tvm import kernels as tvm_kernels

        tokens = self.tokens(x)
        if tokens < SPMM_MIN_TOKENS:
            return ()
        pairs = x.dtype == torch.bfloat16     # token vectors read in pairs, padded to two vectors
        padded = tvm_kernels.padded(tokens, lanes() * (1 + pairs))
        return self.offered(tvm_kernels.candidates(self.values.shape[1], padded, lanes(), pairs=pairs), padded)

    def offered(self, tiles: tuple, tokens: int) -> tuple:
        """``tiles`` less the windowed ones this layer cannot run, or would run as one window (the tile without
        chunks, measured anyway)."""
        return tuple(t for t in tiles if not t.window or self.windowed() and self.window_count(t, tokens) > 1)

    def tiled(self, xt: Tensor, tile, y: Optional[Tensor] = None) -> Tensor:
        """``[out, tokens_padded]`` (float32) from ``xt = [in, tokens_padded]`` by the tiled kernel (into ``y``, if
        given); ``xt`` as `to_tokens_last` packs it (a bf16 input as ``[in, tokens_padded / 2]`` 32-bit words)."""
        io = torch.bfloat16 if xt.dtype == torch.int32 else torch.float32
        y = xt.new_empty(self.out, padded_tokens(xt), dtype=torch.float32) if y is None else y
        self.run("tiled", y.shape[1], xt.view(-1), y, tile=tile, io=io)
        return y


class BoundLinear(_Bound):
    #: The one-token forms measured against each other where there is a choice: the gather kernel on values
    #: and indices, and the bit-mask kernel (`kernels.mask_gemv`, bf16 and fp16 layers on AVX512_VBMI2 CPUs).
    FORMS = ("gather", "bitmask")

    def tokens(self, x: Tensor) -> int:
        return x.numel() // x.shape[-1]

    def tiles(self, x: Tensor) -> tuple:
        if self.tokens(x) < SPMM_MIN_TOKENS:
            return self.FORMS if self.values.dtype in HALF and expands() else ()
        return super().tiles(x)

    def native(self, x: Tensor) -> bool:
        # The one-token kernels read a bf16 / fp16 input and write the layer's dtype themselves; the many-token
        # path packs it (bf16 as 16-bit words, fp16 widened: `to_tokens_last`) and rounds its output in the unpack.
        return x.dtype in HALF

    def _bitmask(self, in_features: int) -> tuple:
        """The layer as `kernels.mask_gemv` reads it, built on first use: per row a 32-bit word per 32
        inputs (padded) and the kept values in input order (duplicate indices summed, as the gather kernel
        does), each row's first value's position, and the compiled kernel by input dtype (float32, or the
        layer's own bf16 / fp16)."""
        found = self.__dict__.get("_mask_form")
        if found is None or found[0] != in_features:
            import tvm_ffi

            from sparsecc.runtimes.tvm import kernels as tvm_kernels

            block = tvm_kernels.MASK_BLOCK
            width = -(-in_features // block) * block
            rows, idx = self.values.shape[0], self.indices.long()
            kept = torch.zeros(rows, width).scatter_add_(1, idx, self.values.float())
            present = torch.zeros(rows, width, dtype=torch.bool).scatter_(1, idx, True)
            packed = kept.to(self.values.dtype)[present].view(torch.int16).contiguous()
            counts = present.sum(1)
            start = (counts.cumsum(0) - counts).to(torch.int32)
            words = (present.view(rows, -1, block).to(torch.int64) << torch.arange(block)).sum(-1)
            words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()
            kernels = {io: _kernel("mask_gemv", width, 1, torch.int32, self.has_bias, dtype=self.values.dtype, io=io)
                       for io in (torch.float32, self.values.dtype)}
            args = tuple(tvm_ffi.from_dlpack(t) for t in (words, packed, start, self.orow, self.arow, self.bias))
            found = self.__dict__["_mask_form"] = (in_features, width, kernels, args, (words, packed, start))
        return found

    def _gemv(self, x1: Tensor, y1: Tensor, form) -> None:
        """One token (``x1 [1, in]``, float32 or the layer's dtype) into ``y1 [1, out]`` (the same dtype) in the
        chosen one-token form."""
        if form != "bitmask":
            self.run("gemv", 1, x1, y1)
            return
        in_features, width, kernels, args, _ = self._bitmask(x1.shape[-1])
        xp = x1[0] if width == in_features else torch.nn.functional.pad(x1[0], (0, width - in_features))
        rows = self.values.shape[0]
        if self.values.dtype == torch.float16:     # the kernel reads each word's inputs as two halves
            xp = xp.contiguous()
            parallel.run(kernels[x1.dtype], rows, rows * width // 4, xp, xp, *args, y1)
        elif x1.dtype == torch.bfloat16:           # the kernel splits the bf16 pairs itself
            pairs = xp.contiguous().view(torch.int32)
            parallel.run(kernels[torch.bfloat16], rows, rows * width // 4, pairs, pairs, *args, y1)
        else:
            halves = xp.float().view(-1, 2).t().contiguous()       # even and odd inputs, one copy
            parallel.run(kernels[torch.float32], rows, rows * width // 4, halves[0], halves[1], *args, y1)

    def signature(self, x: Tensor) -> tuple:
        return ("linear", self.out, x.shape[-1], *self.values.shape, self.indices.dtype, self.has_bias)

    def constant(self, x: Tensor) -> Tensor:
        return _constant(x, self.bias_or_none, (*x.shape[:-1], self.out), -1)

    def _make_dense_forms(self, x: Tensor) -> _dense.DenseForms:
        in_features = x.shape[-1]
        return _LinearForms(lambda: formats.decode_fanin(self.values, self.indices, self.rows, self.out,
                                                         in_features), self.bias_or_none)

    def sparse(self, x: Tensor, tile=None) -> Tensor:
        # Outputs are allocated in their final shape: a tensor of their own, never a view.
        shape = (*x.shape[:-1], self.out)
        if x.numel() == x.shape[-1]:    # one token, any leading shape (a decode step's [1, 1, in]): the fast path
            y = x.new_empty(shape)
            self._gemv(x.view(1, -1), y.view(1, self.out), tile)
            return y
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.shape[0] >= SPMM_MIN_TOKENS:
            # Transposed views would save the copies here but slow the LayerNorms and attention after them
            # (measured on ViT-B/16): outputs stay contiguous.
            tile = tile or self.tile_for(x2, (tuning.bucket(x2.shape[0]), torch.get_num_threads()))
            xt = to_tokens_last(x2, lanes())
            return from_tokens_last(self.tiled(xt, tile, scratch("tokens_last_out", self.out, padded_tokens(xt))),
                                    x2.shape[0], x2.dtype, shape)
        y = x2.new_empty(shape)
        flat = y.view(-1, self.out)
        for t in range(x2.shape[0]):
            self._gemv(x2[t:t + 1], flat[t:t + 1], tile)
        return y

    def _chosen_tile(self, key: tuple[int, int]):
        """This layer's measured tile for ``key`` when its measured choice there is the sparse tiled kernel
        (or it measures nothing); None when it runs dense there or has not been called at that bucket yet."""
        tile = self._tiles.get(key)
        if tile is None or isinstance(tile, str):
            return None
        if self.tune:
            choice = self.choices.get(key)
            if choice is None or choice.dense:
                return None
        return tile

    def chain(self, then: "BoundLinear", acts: list[Callable[[Tensor], object]], x: Tensor,
              observe: bool = False) -> Optional[tuple[Tensor, Optional[tuple[Tensor, Tensor]]]]:
        """``then(acts(self(x)))`` for elementwise ``acts`` (in place), the intermediate kept tokens-last: one
        transpose in, one out, none between (`sparsecc.core.chain`). None where either layer would not run
        its tiled kernel on this call (float32 only, `SPMM_MIN_TOKENS` tokens or more, both layers' measured
        choices sparse and their tiles known: a bucket's first call runs the layers one by one, which measures
        them). ``then`` takes this layer's output width (the caller checks). ``observe``: also return the
        intermediate before and after ``acts``, tokens-first, for the layers' hooks."""
        if type(then) is not BoundLinear or x.dtype != torch.float32 or self.values.dtype != torch.float32 \
                or then.values.dtype != torch.float32 or then.values.shape[0] == 0 or self.values.shape[0] == 0:
            return None
        x = _contiguous(x, torch.float32)
        tokens = x.numel() // x.shape[-1]
        if tokens < SPMM_MIN_TOKENS:
            return None
        key = (tuning.bucket(tokens), torch.get_num_threads())
        first, second = self._chosen_tile(key), then._chosen_tile(key)
        if first is None or second is None:
            return None
        xt = to_tokens_last(x.view(-1, x.shape[-1]), lanes())
        mid = self.tiled(xt, first, scratch("chain_between", self.out, xt.shape[1]))
        lead = x.shape[:-1]
        before = from_tokens_last(mid, tokens).view(*lead, self.out) if observe else None
        for act in acts:
            act(mid)          # elementwise: the layout (and the padding tokens, never read back) do not matter
        after = from_tokens_last(mid, tokens).view(*lead, self.out) if observe else None
        y = from_tokens_last(then.tiled(mid, second, scratch("tokens_last_out", then.out, mid.shape[1])), tokens,
                             shape=(*lead, then.out))
        return y, ((before, after) if observe else None)


#: Strided convolutions run on phase planes (`BoundConv2d._phases`) up to this many planes per channel (a copy
#: each). Windows that do not overlap (ViT's 16x16 patches at stride 16) stay on im2col, a permutation there.
#: Measured (Xeon with AVX-512, 90% fan-in, 1 thread): stride-2 3x3 convolutions of ResNet-50 1.3-1.9x the
#: im2col path, its 7x7 stem 3.1x.
MAX_PHASES = 9


class BoundConv2d(_Bound):
    """Ungrouped convolutions run the flat token kernel on the zero-padded input (no im2col), strided ones with
    overlapping windows on its phase planes (`_phases`: a stride-2 3x3 convolution is a stride-1 2x2 one over
    four planes per channel); the others run the token kernel on ``F.unfold`` columns, 1x1 ones on the input
    itself. A channels-last input is read as it is (the planes' and columns' copies take any layout) and
    answered in channels-last."""

    channels_last = True

    def __init__(self, values: Tensor, indices: Tensor, rows: Optional[Tensor], bias: Optional[Tensor],
                 out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, in_channels: int) -> None:
        super().__init__(values, indices, rows, bias, out_channels, groups,
                         (in_channels // groups) * kernel_size[0] * kernel_size[1])
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.pointwise = kernel_size == [1, 1] and padding == [0, 0] and dilation == [1, 1]
        sh, sw = stride
        overlapping = sh < kernel_size[0] or sw < kernel_size[1]
        self.direct = not self.pointwise and groups == 1 and (
            stride == [1, 1] or overlapping and sh * sw <= MAX_PHASES)
        self.offsets: dict[tuple[int, int], Tensor] = {}
        self.in_channels, self.groups, self.original_indices = in_channels, groups, indices

    def window_index(self) -> Tensor:
        return self.original_indices        # a group's filters count from their group's first channel

    def window_units(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1] if self.direct else 1

    def _phases(self, h: int, w: int) -> tuple[int, int]:
        """Rows and columns of one phase plane of the zero-padded ``h x w`` input: the padded plane split by
        stride (row ``a + sh * qy`` of the padded input is row ``qy`` of phase ``a``), so that a strided
        convolution reads each phase plane at stride 1, as the flat kernel does (stride 1: the padded plane)."""
        (sh, sw), (ph, pw) = self.stride, self.padding
        return -(-(h + 2 * ph) // sh), -(-(w + 2 * pw) // sw)

    def _offsets(self, h: int, w: int) -> Tensor:
        """Flat offset of each tap in the stack of phase planes (`_phases`), for an input of ``h x w``."""
        found = self.offsets.get((h, w))
        if found is None:
            (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
            hq, wq = self._phases(h, w)
            idx = self.indices.long()
            c, ty, tx = idx // (kh * kw), idx % (kh * kw) // kw * dh, idx % kw * dw
            phase = (c * sh + ty % sh) * sw + tx % sw
            found = (phase * hq * wq + ty // sh * wq + tx // sw).to(torch.int32).contiguous()
            self.offsets[(h, w)] = found
        return found

    def _direct(self, sample: Tensor, oh: int, ow: int, tile, into: Tensor) -> None:
        """One sample ``[C, H, W]`` into ``into`` ``[out, oh, ow]``, from its phase planes."""
        from sparsecc.runtimes.tvm.kernels import padded

        c, h, w = sample.shape
        (ph, pw), (sh, sw) = self.padding, self.stride
        hq, wq = self._phases(h, w)
        # Outputs are computed over the phase planes' width (the extra columns are dropped) and up to a whole
        # number of vectors; the input carries enough trailing zeros for the last taps of the last (padding) token.
        tokens = padded(oh * wq, lanes())
        reach = (self.dilation[0] * (self.kernel_size[0] - 1)) // sh * wq + \
            (self.dilation[1] * (self.kernel_size[1] - 1)) // sw
        extra = max(0, reach + tokens - hq * wq)
        # Only the planes' interior is written: the padding (and the trailing zeros) stay zero from the first call.
        flat = zeroed(("conv_planes", c, h, w, ph, pw, sh, sw), c * sh * sw * hq * wq + extra)
        planes = flat[:c * sh * sw * hq * wq].view(c, sh, sw, hq, wq)
        for a in range(sh):               # phase a holds padded rows a, a + sh, ...: input rows from y0 on
            qy = max(0, -(-(ph - a) // sh))
            y0 = a + sh * qy - ph
            for b in range(sw):
                qx = max(0, -(-(pw - b) // sw))
                x0 = b + sw * qx - pw
                if y0 < h and x0 < w:
                    part = sample[:, y0::sh, x0::sw]
                    planes[:, a, b, qy:qy + part.shape[1], qx:qx + part.shape[2]].copy_(part)
        y = scratch("conv_out", self.out, tokens)
        self.run("tiled_flat", tokens, flat, y, (self.values, self._offsets(h, w), self.orow, self.arow, self.bias),
                 tile)
        into.copy_(y[:, :oh * wq].view(self.out, oh, wq)[:, :, :ow])

    def tiles(self, x: Tensor) -> tuple:
        from sparsecc.runtimes.tvm import kernels as tvm_kernels

        padded = tvm_kernels.padded(self.tokens(x), lanes())
        return self.offered(tvm_kernels.candidates(self.values.shape[1], padded, lanes()), padded)

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        return tuple(ops.conv_out_size(s, k, st, p, d) for s, k, st, p, d in
                     zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, self.dilation))

    def tokens(self, x: Tensor) -> int:
        oh, ow = self._out_size(x)
        return oh * ow

    def signature(self, x: Tensor) -> tuple:
        return ("conv2d", self.out, self.in_channels, *self.kernel_size, *self.stride, *self.padding,
                *self.dilation, self.groups, *self.values.shape, *x.shape[-2:], self.has_bias)

    def constant(self, x: Tensor) -> Tensor:
        return _constant(x, self.bias_or_none, (*x.shape[:-3], self.out, *self._out_size(x)), x.dim() - 3)

    def _make_dense_forms(self, x: Tensor) -> _dense.DenseForms:
        kh, kw = self.kernel_size
        fan_in = self.in_channels // self.groups * kh * kw
        decode = lambda: formats.decode_fanin(self.values, self.original_indices, self.rows, self.out,  # noqa: E731
                                              fan_in).view(self.out, self.in_channels // self.groups, kh, kw)
        return _dense.ConvForms(decode, self.bias_or_none, self.stride, self.padding, self.dilation, self.groups)

    def sparse(self, x: Tensor, tile=None) -> Tensor:
        from sparsecc.runtimes.tvm.kernels import padded

        unbatched = x.dim() == 3
        xb = x.unsqueeze(0) if unbatched else x
        n, c, h, w = xb.shape
        oh, ow = self._out_size(x)
        tile = tile or self.tile_for(x, (tuning.bucket(oh * ow), torch.get_num_threads()))
        tokens = padded(oh * ow, lanes())
        # The output is allocated whole and each sample written into it (no stack of per-sample outputs).
        y = x.new_empty(n, self.out, oh, ow)
        for i in range(n):
            if self.direct:
                self._direct(xb[i], oh, ow, tile, y[i])
                continue
            if self.pointwise:
                sample = xb[i, :, ::self.stride[0], ::self.stride[1]] if self.stride != [1, 1] else xb[i]
            else:
                sample = F.unfold(xb[i:i + 1], self.kernel_size, self.dilation, self.padding, self.stride)[0]
            if tokens == oh * ow:       # whole vectors already (56x56, 28x28): the columns as they are
                self.tiled(sample.reshape(-1, tokens).contiguous(), tile, y[i].view(self.out, tokens))
            else:                       # the padding tokens' columns stay zero from the first call
                rows = sample.shape[0]
                cols = zeroed(("conv_columns", rows, oh * ow), rows * tokens).view(rows, tokens)
                cols[:, :oh * ow].copy_(sample.reshape(-1, oh * ow))
                out = self.tiled(cols, tile, scratch("conv_out", self.out, tokens))
                y[i].copy_(out[:, :oh * ow].view(self.out, oh, ow))
        if _dense.is_channels_last(x):      # the answer in the input's layout, as torch's convolution gives it
            y = y.contiguous(memory_format=torch.channels_last)
        return y[0] if unbatched else y


def nm_kind(in_features: int, target) -> Optional[str]:
    """The 2:4 one-token kernel for this input width and target, or None (the fan-in kernels run instead)."""
    from tvm.target import codegen

    if in_features % 16 == 0 and codegen.target_has_features("avx", target):
        return "nm_gemv_avx"
    return "nm_gemv" if in_features % 32 == 0 else None


class BoundNM(_Tuned):
    """2:4 Linear: few tokens read the 2-bit metadata directly; many tokens (or shapes the 2:4 kernels do
    not take) run the fan-in kernels on the expanded positions (k = in/2)."""

    def __init__(self, values: Tensor, metadata: Tensor, bias: Optional[Tensor], in_features: int,
                 compile_kernel: bool = True) -> None:
        self.values, self.metadata, self.in_features, self.out = values, metadata, in_features, values.shape[0]
        self.has_bias = bias is not None
        self.bias_or_none = bias
        self.bias = bias.float().contiguous() if bias is not None else torch.zeros(self.out)
        groups = in_features // 4
        self.kind = nm_kind(in_features, kernel_cache().target)
        self.direct = (_kernel(self.kind, groups, 1, torch.int16, self.has_bias, dtype=values.dtype)
                       if self.kind and compile_kernel else None)
        self._fanin: Optional[BoundLinear] = None
        super().__init__(values)

    @property
    def fanin(self) -> BoundLinear:
        """The fan-in binding on expanded positions, built on first use (its indices cost in/2 per row)."""
        if self._fanin is None:
            indices = formats.nm_indices(self.metadata, self.in_features).to(formats.index_dtype(self.in_features))
            self._fanin = BoundLinear(self.values, indices, None, self.bias_or_none, self.out)
            self._fanin.tune = False       # this layer's own choice covers it
        return self._fanin

    def _layout(self, x1: Tensor) -> Tensor:
        """The input as the kernel reads it: the AVX kernel reorders it itself; the portable one takes it
        de-interleaved by position in group."""
        if self.kind == "nm_gemv_avx":
            return x1
        return x1.view(-1, 4).t().contiguous()

    def tokens(self, x: Tensor) -> int:
        return x.numel() // x.shape[-1]

    def signature(self, x: Tensor) -> tuple:
        return ("nm_linear", self.out, self.in_features, self.kind, self.has_bias)

    def constant(self, x: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], 0)

    def _make_dense_forms(self, x: Tensor) -> _dense.DenseForms:
        return _LinearForms(lambda: formats.decode_fanin(self.values, formats.nm_indices(
            self.metadata, self.in_features), None, self.out, self.in_features), self.bias_or_none)

    def _on_fanin(self, tokens: int) -> bool:
        return self.direct is None or tokens >= SPMM_MIN_TOKENS

    def tiles(self, x: Tensor) -> tuple:
        return self.fanin.tiles(x) if self._on_fanin(self.tokens(x)) else ()

    def native(self, x: Tensor) -> bool:
        # the fan-in path takes a bf16 / fp16 input as it is (`BoundLinear.native`); the 2:4 kernels float32
        return self._on_fanin(self.tokens(x)) and self.fanin.native(x)

    def sparse(self, x: Tensor, tile=None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        tokens = x2.shape[0]
        if self._on_fanin(tokens):
            return self.fanin.sparse(x, tile)
        y = x2.new_empty(tokens, self.out)
        work = self.out * self.in_features // 2
        for t in range(tokens):
            parallel.run(self.direct, self.out, work, self._layout(x2[t:t + 1]), self.values, self.metadata,
                         self.bias, y[t:t + 1])
        return y.reshape(*x.shape[:-1], self.out)


def bind(op: str, *constants) -> Callable[[Tensor], Tensor]:
    """A callable running ``op`` on an input with everything else fixed: what a layer keeps between calls."""
    return BINDINGS[op](*constants)


class LazyConv:
    """Grouped convolutions need the input's channel count to place indices: bound on the first input."""

    def __init__(self, *constants) -> None:
        self.constants, self.bound = constants, None

    @property
    def choices(self) -> dict:
        return self.bound.choices if self.bound is not None else {}

    def __call__(self, x: Tensor) -> Tensor:
        if self.bound is None:
            self.bound = BoundConv2d(*self.constants, in_channels=x.shape[-3])
        return self.bound(x)

    def sparse_buckets(self, since: int = 0) -> list[tuple[int, int]]:
        return self.bound.sparse_buckets(since) if self.bound is not None else []

    def run_dense(self, key: tuple[int, int], dense: bool = True) -> None:
        self.bound.run_dense(key, dense)

    def settle(self) -> None:
        if self.bound is not None:
            self.bound.settle()


def bound(op: str, *constants) -> Callable[[Tensor], Tensor]:
    """`bind`, cached on the layer's values tensor (`binding.bound`)."""
    from sparsecc.runtimes import binding

    return binding.bound("_sparsecc_bound", bind, op, *constants)


#: Op name -> what binds a layer's constants for this runtime: the ops TVM runs. A plug-in pattern adds its own
#: with `register_binding`; the patterns name no backend.
BINDINGS: dict[str, Callable[..., Callable[[Tensor], Tensor]]] = {
    _patterns.fanin.LINEAR.name: BoundLinear,
    _patterns.fanin.CONV2D.name: LazyConv,
    _patterns.nm.LINEAR.name: BoundNM,
}


def register_binding(op: str, factory: Callable[..., Callable[[Tensor], Tensor]]) -> None:
    """Run ``op`` on TVM: ``factory(*constants)`` returns the layer's callable (see `BoundLinear`)."""
    BINDINGS[op] = factory
    _patterns.changed()


def _kernel_of(op) -> Optional[Callable]:
    if op.name not in BINDINGS:
        return None
    return lambda x, *constants: bound(op.name, *constants)(x)


KERNELS = _patterns.OpTable(_kernel_of)
