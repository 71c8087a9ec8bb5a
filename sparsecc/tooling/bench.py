"""``sparsecc bench``: batch-1 CPU latency of condensed layers and models against their peers, at 1 thread
and at every core.

Each thread count is set with ``torch.set_num_threads`` (sparsecc's kernels follow it; onnxruntime sessions
get the same count), every number is the median of interleaved rounds after warm-up, and every ratio divides
two medians taken in the same rounds at the same thread count. Every method's output is checked against the
masked dense layer before it is timed; a method that disagrees is reported as invalid, not timed.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import sparsecc
from sparsecc.compiler.validation import compare
from sparsecc.core.timing import SETTLE, THREADS, medians
from sparsecc.tooling import peers, synthetic

#: ViT-B/16 encoder layer 11 mlp.3, the layer the SRigL paper times.
SRIGL_LAYER = (768, 3072)
SPARSITIES = (0.8, 0.9, 0.95, 0.99)
#: Layer timings: calls per method per interleaved round; the median is a warm-cache time.
BURST = 10


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def step(self, what: str) -> None:
        self.done += 1
        filled = int(30 * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {what[:50]:<50}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def layer_methods(weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, directory: Path, threads: int = 1,
                  openvino: bool = False) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every way to run one masked Linear, keyed by the name the tables use (peers with their precision)."""
    masked = weight * mask
    dense = nn.Linear(*reversed(weight.shape)).eval()
    with torch.no_grad():
        dense.weight.copy_(masked)
        dense.bias.copy_(bias)
    csr = masked.to_sparse_csr()
    k = int(mask.sum(1).max())
    live = mask.sum(1) > 0
    idx = torch.zeros(weight.shape[0], k, dtype=torch.long)
    vals = torch.zeros(weight.shape[0], k)
    idx[live] = torch.nonzero(mask[live])[:, 1].view(-1, k)
    vals[live] = torch.gather(masked[live], 1, idx[live])

    def srigl(x):   # the SRigL paper's condensed matmul
        return torch.sum(vals * x[..., idx], dim=-1) + bias

    methods: dict[str, Callable] = {
        "dense eager": dense,
        "dense torch.compile": torch.compile(dense),
        "torch CSR": lambda x: torch.sparse.addmm(bias[:, None], csr, x.t()).t(),
        "SRigL method (torch.compile)": torch.compile(srigl),
    }
    layer = nn.Sequential(dense).eval()
    example = (torch.randn(1, weight.shape[1]),)
    for peer in peers.peers(layer, example, directory, threads, masks={"0.weight": mask}, openvino=openvino):
        if peer.fn is not None:
            methods[peer.label] = peer.fn
    for backend in ("reference", "tvm"):
        methods[f"sparsecc {backend}"] = sparsecc.compile(layer, example, masks={"0.weight": mask}, backend=backend)
    return methods


@dataclass
class Row:
    name: str
    times: dict[str, float]                 # method -> median seconds
    invalid: dict[str, str] = field(default_factory=dict)
    threads: int = 1

    def ratio(self, method: str, base: str = "dense eager") -> float:
        return self.times[base] / self.times[method]


def _tolerance(method: str) -> Optional[float]:
    """A peer's check tolerance from the precision its name ends with: ``(bf16)`` is checked loosely."""
    precision = method.rsplit("(", 1)[-1].rstrip(")") if method.endswith(")") else "fp32"
    return peers.tolerance(precision)


def bench_layer(name: str, weight, bias, mask, runs: int, progress: Progress, threads: int = 1,
                openvino: bool = False) -> Row:
    torch.set_num_threads(threads)      # before compiling: sparsecc's choices are measured at this count
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        methods = layer_methods(weight, bias, mask, Path(tmp), threads, openvino)
        x = torch.randn(1, weight.shape[1])
        expected = F.linear(x, weight * mask, bias)
        valid, invalid = {}, {}
        for method, fn in methods.items():
            stat = compare(method, fn(x), expected, _tolerance(method))
            (valid if stat.ok else invalid)[method] = fn if stat.ok else str(stat)
        times = medians({m: (lambda fn=fn: fn(x)) for m, fn in valid.items()}, runs=max(1, runs // BURST),
                        warmup=5, burst=BURST)
    progress.step(f"{name}, {threads} thread(s)")
    return Row(name, times, invalid, threads)


def _rss_child(name: str, compiled: bool, structure: str) -> int:
    """Resident memory (bytes) of a fresh process holding the dense masked or the compiled model and having
    run it once, after the source model is gone and freed memory is handed back to the OS (``malloc_trim``;
    otherwise glibc keeps it and RSS only shows the peak of building the model)."""
    code = (
        "import ctypes, gc, torch, sparsecc\n"
        "from sparsecc.tooling.demo import sparse_model\n"
        f"model = sparse_model({name!r}, 0.9, 0.05, structure={structure!r})\n"
        "x = torch.randn(1, 3, 224, 224)\n"
        f"run = sparsecc.compile(model, (x,)) if {compiled} else sparsecc.masked_reference(model)\n"
        "del model; gc.collect()\n"
        "with torch.no_grad(): run(x)\n"
        "gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0)\n"
        "print([lay for lay in open('/proc/self/status') if lay.startswith('VmRSS')][0].split()[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    return sum(storages.values())


@dataclass
class ModelRow:
    name: str
    structure: str
    threads: int
    times: dict[str, float]
    invalid: dict[str, str]     # method -> how its output differed from the masked model's (not timed)
    compile_cold: float
    compile_warm: float
    bytes_dense: int
    bytes_condensed: int
    model_dense: int
    model_compiled: int
    rss_dense: Optional[int]
    rss_compiled: Optional[int]
    max_rel_error: float
    dense_chosen: int = 0       # condensed layers whose measured choice is the dense op
    condensed: int = 0
    errors: dict[str, float] = field(default_factory=dict)      # method -> max error relative to max |output|
    tiles: dict[str, int] = field(default_factory=dict)         # the tiled kernel's tile -> layers that chose it


def bench_model(name: str, runs: int, progress: Progress, memory: bool, threads: int = 1,
                structure: str = "fanin", openvino: bool = False) -> ModelRow:
    """One model at one thread count. Compile times are cold (fresh kernel and tuning caches: kernels compiled,
    every layer's choice measured) and warm (both from disk, as in a new process)."""
    from sparsecc.runtimes import dense as dense_ops
    from sparsecc.runtimes.tvm import runtime as tvm_runtime
    from sparsecc.tooling.demo import sparse_model

    torch.set_num_threads(threads)
    model = sparse_model(name, 0.9, 0.05, structure=structure)
    x = torch.randn(1, 3, 224, 224)
    os.environ["SPARSECC_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsecc-bench-")
    tvm_runtime.forget_caches()
    dense_ops.forget_caches()
    start = time.perf_counter()
    compiled = sparsecc.compile(model, (x,))
    cold = time.perf_counter() - start
    tvm_runtime.forget_caches()     # as in a new process: everything comes from disk
    dense_ops.forget_caches()
    start = time.perf_counter()
    compiled = sparsecc.compile(model, (x,))
    warm = time.perf_counter() - start
    dense = sparsecc.masked_reference(model)
    report = compiled.report
    via_dynamo = torch.compile(model, backend="sparsecc")
    with tempfile.TemporaryDirectory() as tmp:
        others = peers.peers(model, (x,), Path(tmp), threads, openvino=openvino)
        library = sparsecc.load_tvm(sparsecc.export_tvm(compiled, (x,), Path(tmp) / f"{name}.so").path)
    tvm_library = lambda x: torch.from_numpy(library(x))  # noqa: E731
    methods = {"dense eager": dense, "sparsecc": compiled, "torch.compile sparsecc": via_dynamo,
               "TVM library": tvm_library, **{p.label: p.fn for p in others if p.fn is not None}}
    if openvino:     # beside the peers' reduced precision: sparsecc's own (`compile(..., precision="bf16")`),
        methods["sparsecc (bf16)"] = sparsecc.compile(model, (x,), precision="bf16")    # and with its rest fused
        methods["sparsecc fused (bf16)"] = sparsecc.compile(model, (x,), precision="bf16", fuse=True)
    invalid = {p.label: p.unavailable for p in others if p.fn is None}
    errors = {}
    with torch.no_grad():
        expected = dense(x)
        for method, fn in methods.items():     # each output checked on two calls before any is timed
            for _ in range(2):
                stat = compare(method, fn(x), expected, _tolerance(method))
                errors[method] = stat.max_rel
                if not stat.ok:
                    invalid[method] = str(stat)
        if "sparsecc" in invalid:
            raise sparsecc.EquivalenceError(f"{name} {structure}, {threads} thread(s): {invalid['sparsecc']}")
        times = medians({m: (lambda fn=fn: fn(x)) for m, fn in methods.items() if m not in invalid}, runs=runs,
                        warmup=2, settle=SETTLE)
    rss = (_rss_child(name, False, structure), _rss_child(name, True, structure)) if memory else (None, None)
    progress.step(f"{name} {structure}, {threads} thread(s)")
    choices = [m.choices() for m in compiled.module.modules() if hasattr(m, "choices")]
    dense_chosen = sum(any(c.dense for c in found.values()) for found in choices)
    tiles: dict[str, int] = {}
    for found in choices:
        for tile in {c.tile for c in found.values() if c.tile}:
            tiles[tile] = tiles.get(tile, 0) + 1
    return ModelRow(name, structure, threads, times, invalid, cold, warm, sum(lay.bytes_dense for lay in report.layers),
                    sum(lay.bytes_condensed for lay in report.layers), tensor_bytes(dense), tensor_bytes(compiled),
                    *rss, max(s.max_rel for s in report.end_to_end), dense_chosen, len(report.condensed), errors,
                    dict(sorted(tiles.items(), key=lambda kv: -kv[1])))


#: (name, layer, example input) for the onnxruntime formulation crossovers: ViT-B/16 and ResNet shapes.
FORMULATION_CASES = (
    ("Linear 768→3072, 197 tokens", lambda: nn.Linear(768, 3072), (1, 197, 768)),
    ("Linear 3072→768, 1 token", lambda: nn.Linear(3072, 768), (1, 3072)),
    ("Conv 3x3 256→256, 14x14", lambda: nn.Conv2d(256, 256, 3, padding=1), (1, 256, 14, 14)),
    ("Conv 1x1 64→256, 56x56", lambda: nn.Conv2d(64, 256, 1), (1, 64, 56, 56)),
)


def formulation_table(runs: int = 30) -> str:
    """onnxruntime latency of each export formulation of one layer relative to its dense form, by sparsity and
    ablated fraction: the measurements behind `sparsecc.runtimes.onnxruntime.forms.pick`."""
    from sparsecc.runtimes.onnxruntime import engine as ort_runtime

    torch.set_num_threads(1)
    lines = ["| layer | fan-in sparsity | ablated rows | dense | rows | gather |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, make, shape in FORMULATION_CASES:
            layer = nn.Sequential(make()).eval()
            x = torch.randn(*shape)
            expected_shape = pytree.tree_structure(layer(x))
            for sparsity, ablate in ((0.9, 0.05), (0.9, 0.3), (0.9, 0.6), (0.99, 0.0)):
                masks = {"0.weight": synthetic.fanin_mask(layer[0].weight, sparsity, ablate)}
                reference = sparsecc.masked_reference(layer, masks)(x)
                fns = {}
                for form in ("dense", "rows", "gather"):
                    if form == "gather" and isinstance(layer[0], nn.Conv2d):
                        continue
                    exported = sparsecc.export_onnx(layer, x, Path(tmp) / f"{form}.onnx", masks=masks,
                                                    **({"mode": "dense"} if form == "dense" else {"formulation": form}))
                    fn = ort_runtime.load(exported.path, exported.input_names, expected_shape)
                    stat = compare(form, fn(x), reference)
                    if not stat.ok:
                        raise sparsecc.EquivalenceError(f"{name} {form}: {stat}")
                    fns[form] = fn
                times = medians({f: (lambda fn=fn: fn(x)) for f, fn in fns.items()}, runs=runs, warmup=3)
                cells = [f"{_us(times['dense'])} µs"] + [
                    f"{_us(times[f])} µs ({times['dense'] / times[f]:.2f}x)" if f in times else "-"
                    for f in ("rows", "gather")]
                lines.append(f"| {name} | {sparsity:.0%} | {ablate:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def layer_table(rows: list[Row]) -> str:
    methods = list(rows[0].times) + [m for m in rows[0].invalid if m not in rows[0].times]
    head = "| layer 3072→768, batch 1 | threads | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    for r in rows:
        cells = [f"{_us(r.times[m])} µs ({r.ratio(m):.2f}x)" if m in r.times else "invalid" for m in methods]
        lines.append(f"| {r.name} | {r.threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_table(rows: list[ModelRow]) -> str:
    """One row per model, structure and thread count; every other method (peers named with their precision) as
    its time and its ratio to dense eager fp32."""
    others = tuple(dict.fromkeys(m for r in rows for m in (*r.times, *r.invalid)
                                 if m not in ("dense eager", "sparsecc")))
    lines = ["| model (5% ablated), batch 1 | masks | threads | dense eager | sparsecc | speed-up | "
             + " | ".join(others) + " | layers run dense by choice | tiles chosen (layers) | compile cold / warm | "
             "analysed weights dense → condensed | all model tensors | process RSS | max rel error |",
             "|" + "---|" * (13 + len(others))]
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    for r in rows:
        rss = f"{mib(r.rss_dense)} → {mib(r.rss_compiled)} MiB" if r.rss_dense else "not measured"
        ort = " | ".join(f"{r.times[m] * 1e3:.1f} ms ({r.times['dense eager'] / r.times[m]:.2f}x)"
                         if m in r.times else "invalid" for m in others)
        masks = "90% fan-in" if r.structure == "fanin" else r.structure
        lines.append(f"| {r.name} | {masks} | {r.threads} | {r.times['dense eager'] * 1e3:.1f} ms | "
                     f"{r.times['sparsecc'] * 1e3:.1f} ms | {r.times['dense eager'] / r.times['sparsecc']:.2f}x | "
                     f"{ort} | {r.dense_chosen}/{r.condensed} | "
                     f"{', '.join(f'{t} ({n})' for t, n in r.tiles.items()) or '-'} | "
                     f"{r.compile_cold:.1f} s / {r.compile_warm:.1f} s | "
                     f"{mib(r.bytes_dense)} → {mib(r.bytes_condensed)} MiB | {mib(r.model_dense)} → "
                     f"{mib(r.model_compiled)} MiB | {rss} | {r.max_rel_error:.1e} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Latency vs sparsity of every method, one panel per thread count."""
    import matplotlib

    from sparsecc.runtimes import cpu

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r.threads for r in rows})
    fig, axes = plt.subplots(1, len(counts), figsize=(7 * len(counts), 4.5), squeeze=False)
    for ax, threads in zip(axes[0], counts):
        fan_in = [r for r in rows if r.name.endswith("% fan-in") and r.threads == threads]
        x = [float(r.name.split("%")[0]) for r in fan_in]
        for method in fan_in[0].times:
            ax.plot(x, [r.times.get(method, float("nan")) * 1e6 for r in fan_in], marker="o", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (%), constant fan-in")
        ax.set_ylabel(f"median latency (µs), batch 1, {threads} thread(s)")
        ax.set_title(f"Linear 3072→768 (ViT-B/16 encoder 11 mlp.3), {threads} thread(s)\n{cpu.model()}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


#: (label, layer, input shape, sparsity) for `token_layer_table`: ViT-B/16's Linears at 197 tokens and a
#: ResNet-style 3x3 convolution at 14x14, all constant fan-in.
TOKEN_LAYERS = (
    ("Linear 768→2304 (qkv), 197 tokens", lambda: nn.Linear(768, 2304), (1, 197, 768), 0.9),
    ("Linear 768→768 (proj), 197 tokens", lambda: nn.Linear(768, 768), (1, 197, 768), 0.9),
    ("Linear 768→3072 (fc1), 197 tokens", lambda: nn.Linear(768, 3072), (1, 197, 768), 0.9),
    ("Linear 3072→768 (fc2), 197 tokens", lambda: nn.Linear(3072, 768), (1, 197, 3072), 0.9),
    ("Linear 3072→768 (fc2), 128 tokens", lambda: nn.Linear(3072, 768), (1, 128, 3072), 0.9),
    ("Conv 3x3 256→256, 14x14", lambda: nn.Conv2d(256, 256, 3, padding=1), (1, 256, 14, 14), 0.95),
)


def token_layer_table(runs: int = 30, threads: tuple[int, ...] = THREADS) -> str:
    """The many-token kernels on single layers, dense eager vs sparsecc (its tile chosen by measurement),
    interleaved medians at each thread count, with each side's FLOP rate: dense on every weight, sparsecc on
    the nonzeros (what the kernel computes)."""
    from sparsecc.runtimes import cpu

    lines = [f"CPU: {cpu.describe()}", "", "| layer | sparsity | threads | dense | sparsecc | speed-up | "
             "dense GFLOP/s | sparsecc GFLOP/s on nonzeros | tile |", "|" + "---|" * 9]
    with torch.no_grad():
        for label, make, shape, sparsity in TOKEN_LAYERS:
            torch.manual_seed(0)
            layer = nn.Sequential(make()).eval()
            masks = {"0.weight": synthetic.fanin_mask(layer[0].weight, sparsity)}
            x = torch.randn(*shape)
            dense = sparsecc.masked_reference(layer, masks)
            out = dense(x)
            macs = out.numel() // out.shape[1 if out.dim() == 4 else -1] * layer[0].weight[0].numel() * \
                (out.shape[1] if out.dim() == 4 else out.shape[-1])
            nonzero = macs * float(masks["0.weight"].float().mean())
            for n in threads:
                torch.set_num_threads(n)
                compiled = sparsecc.compile(layer, (x,), masks=masks)
                t = medians({"dense": lambda: dense(x), "sparsecc": lambda: compiled(x)}, runs=runs, warmup=3,
                            burst=3)
                tile = next((c.tile for c in compiled.module.get_submodule("0").choices().values() if c.tile), "-")
                lines.append(f"| {label} | {sparsity:.0%} | {n} | {_us(t['dense'])} µs | {_us(t['sparsecc'])} µs | "
                             f"{t['dense'] / t['sparsecc']:.2f}x | {2 * macs / t['dense'] / 1e9:.0f} | "
                             f"{2 * nonzero / t['sparsecc'] / 1e9:.0f} | {tile} |")
    return "\n".join(lines)


def narrow_table(models: tuple[str, ...] = ("vit_b_16", "resnet50"), runs: int = 10, ablate: float = 0.3) -> str:
    """Condensed only vs condensed + physically narrower (`compile(narrow=True)`), 90% fan-in with ``ablate``
    of the neurons ablated, batch 1, medians of interleaved rounds in one process."""
    from sparsecc.tooling.demo import sparse_model

    torch.set_num_threads(1)
    lines = [f"| model (90% fan-in, {ablate:.0%} ablated), batch 1 | dense eager | condensed | condensed + narrow "
             "| narrow vs condensed | pairs narrowed | parameters condensed → narrowed |", "|" + "---|" * 7]
    for name in models:
        model = sparse_model(name, 0.9, ablate)
        x = torch.randn(1, 3, 224, 224)
        condensed = sparsecc.compile(model, (x,), narrow=False)
        narrowed = sparsecc.compile(model, (x,), narrow=True)     # validated against the masked original
        dense = sparsecc.masked_reference(model)
        t = medians({"dense": lambda: dense(x), "condensed": lambda: condensed(x),
                     "narrowed": lambda: narrowed(x)}, runs=runs, warmup=2)
        pairs = len(narrowed.report.narrowed)
        params = [sum(p.numel() for p in m.module.parameters()) + sum(b.numel() for b in m.module.buffers())
                  for m in (condensed, narrowed)]
        lines.append(f"| {name} | {t['dense'] * 1e3:.1f} ms | {t['condensed'] * 1e3:.1f} ms "
                     f"({t['dense'] / t['condensed']:.2f}x) | {t['narrowed'] * 1e3:.1f} ms "
                     f"({t['dense'] / t['narrowed']:.2f}x) | {t['condensed'] / t['narrowed']:.2f}x | {pairs} | "
                     f"{params[0]:,} → {params[1]:,} |")
    return "\n".join(lines)


def peer_table(rows: list[ModelRow]) -> str:
    """The peers at a glance: each method's speed-up over dense eager fp32 and its max error, per model,
    structure and thread count (the precision is in the method's name)."""
    methods = tuple(dict.fromkeys(m for r in rows for m in (*r.times, *r.invalid) if m != "dense eager"))
    lines = ["| model, masks | threads | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 2)]
    for r in rows:
        cells = [f"{r.times['dense eager'] / r.times[m]:.2f}x (err {r.errors.get(m, 0):.0e})" if m in r.times
                 else ("unavailable" if m in r.invalid and "not importable" in r.invalid[m] else
                       "invalid" if m in r.invalid else "-") for m in methods]
        masks = "90% fan-in" if r.structure == "fanin" else r.structure
        lines.append(f"| {r.name}, {masks} | {r.threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(out: Path, runs: int = 200, model_runs: int = 10, models: tuple[str, ...] = ("vit_b_16", "resnet50"),
        memory: bool = True, threads: tuple[int, ...] = THREADS, structures: tuple[str, ...] = ("fanin", "2:4"),
        openvino: bool = False) -> str:
    out.mkdir(parents=True, exist_ok=True)
    os.environ["SPARSECC_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsecc-bench-")   # cold-cache compile timing
    layer_cases = len(SPARSITIES) + 1
    progress = Progress((layer_cases + len(models) * len(structures)) * len(threads))
    torch.manual_seed(0)
    out_f, in_f = SRIGL_LAYER
    weight, bias = torch.randn(out_f, in_f) * 0.02, torch.randn(out_f) * 0.02
    masks = [(f"{s:.0%} fan-in", synthetic.fanin_mask(weight, s)) for s in SPARSITIES]
    masks.append(("50% 2:4", synthetic.nm_mask(weight)))
    rows = [bench_layer(name, weight, bias, mask, runs, progress, n, openvino) for n in threads
            for name, mask in masks]
    model_rows = [bench_model(m, model_runs, progress, memory and n == threads[0], n, structure, openvino)
                  for m in models for structure in structures for n in threads]
    plot(rows, out / "latency.png")
    from sparsecc.runtimes import cpu

    peer_text = f"### Peers\n\n{peer_table(model_rows)}\n\n" if model_rows else ""
    text = (f"CPU: {cpu.describe()}\n\n### SRigL layer\n\n{layer_table(rows)}\n\n" + peer_text + "".join(
        f"- {r.name}, {r.threads} thread(s): invalid {m}: {why}\n" for r in rows for m, why in r.invalid.items()) +
        (f"### End to end\n\n{model_table(model_rows)}\n" if model_rows else "") + "".join(
        f"- {r.name} {r.structure}, {r.threads} thread(s): invalid {m}: {why}\n" for r in model_rows
        for m, why in r.invalid.items()))
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"layers": [r.__dict__ for r in rows],
                                                  "models": [r.__dict__ for r in model_rows]}, indent=1))
    gc.collect()
    return text
