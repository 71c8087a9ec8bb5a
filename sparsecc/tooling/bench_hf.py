"""Benchmarks of the models users bring, at 1 thread and every core, dense vs sparsecc in the same process
(interleaved rounds, medians; "dense" is the user's masked model with its masks baked into plain weights, so
it pays no mask multiply):

- `llm`: a Llama-style decoder (random weights from a config), greedy decoding with the KV cache at batch 1:
  a prompt of ``prompt`` tokens in one call, then ``new_tokens`` calls of one token; tokens/s of each phase.
- `encoder`: the trained all-MiniLM-L6-v2 sentence encoder, one sequence of each length.
- `model`: any model and call (the CLI's ``sparsecc bench MODEL``).

Every compiled model is validated by compile; the decode benchmark also checks that greedy decoding gives the
dense model's tokens, and reports a mismatch instead of a speed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import sparsecc
from sparsecc.core.inputs import Call
from sparsecc.core.timing import SETTLE, THREADS, medians
from sparsecc.tooling import hf, synthetic

#: ``--dtype`` names -> torch dtypes: models are benchmarked in the dtype they ship in (LLMs: bf16).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Decode benchmark masks: label -> (structure, sparsity). Per-row unstructured (SparseGPT / Wanda per output)
#: keeps the same number of weights in every row: constant fan-in.
LLM_MASKS = {"2:4": ("2:4", 0.5), "50% per-row": ("fanin", 0.5), "70% per-row": ("fanin", 0.7)}


@dataclass
class Timing:
    """Dense and sparsecc medians of one case at one thread count."""

    case: str
    threads: int
    dense: dict[str, float]                 # phase -> median seconds
    sparse: dict[str, float]
    units: dict[str, int] = field(default_factory=dict)     # phase -> tokens it produces (tokens/s columns)
    invalid: str = ""
    #: Peers of a whole-model call (`model(..., peers_of=)`), by label with their precision: median seconds, or
    #: why there is none (unavailable, or its output is not the dense model's).
    peers: dict[str, float] = field(default_factory=dict)
    peers_invalid: dict[str, str] = field(default_factory=dict)

    def speedup(self, phase: str) -> float:
        return self.dense[phase] / self.sparse[phase]


def _decoder_layers(fqn: str, kind: str) -> bool:
    return fqn.startswith("model.layers.")


def _decode_phases(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Seconds of the prefill call and of the ``new_tokens`` one-token decode calls that follow it."""
    seconds: dict[str, float] = {}
    hf.decode(model, prompt, new_tokens + 1, seconds)
    return seconds


def _interleaved(fns: dict[str, Callable[[], dict[str, float]]], runs: int) -> dict[str, dict[str, float]]:
    """Per function, per phase: the median over ``runs`` interleaved rounds after one warm-up round."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for name, fn in fns.items():
            samples[name].append(fn())
    return {name: {phase: statistics.median(s[phase] for s in runs_) for phase in runs_[0]}
            for name, runs_ in samples.items()}


def llm(runs: int = 3, threads: Sequence[int] = THREADS, prompt: int = 32, new_tokens: int = 64,
        masks: Sequence[str] = tuple(LLM_MASKS), config: Optional[dict[str, int]] = None,
        log: Callable[[str], None] = lambda _: None, dtype: str = "fp32") -> list[Timing]:
    """Greedy decode with the KV cache, dense vs sparsecc, for each mask of `LLM_MASKS` and thread count, the
    model in ``dtype`` (dense is the masked model in that dtype too)."""
    rows = []
    for label in masks:
        structure, sparsity = LLM_MASKS[label]
        model = hf.llama(**(config or {})).to(DTYPES[dtype])
        synthetic.attach_with_prune(model, synthetic.structured_masks(model, structure, sparsity,
                                                                      include=_decoder_layers))
        dense = sparsecc.masked_reference(model)
        ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
        log(f"llm {label}: compiling")
        compiled = sparsecc.compile(model, example_kwargs={"input_ids": ids})
        del model
        want, got = hf.decode(dense, ids, new_tokens), hf.decode(compiled, ids, new_tokens)
        invalid = hf.greedy_agreement(dense, compiled, ids, want, got)
        for n in threads:
            torch.set_num_threads(n)
            log(f"llm {label}: timing at {n} thread(s)")
            t = _interleaved({"dense": lambda: _decode_phases(dense, ids, new_tokens),
                              "sparse": lambda: _decode_phases(compiled, ids, new_tokens)}, runs)
            rows.append(Timing(f"{label}, {dtype}", n, t["dense"], t["sparse"],
                               {"prefill": prompt, "decode": new_tokens}, invalid))
    return rows


def llm_table(rows: list[Timing]) -> str:
    lines = ["| masks | threads | prefill tok/s dense → sparsecc | speed-up | decode tok/s dense → sparsecc | "
             "speed-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.invalid:
            lines.append(f"| {r.case} | {r.threads} | invalid: {r.invalid} | | | |")
            continue
        cells = [f"{r.units[p] / r.dense[p]:.1f} → {r.units[p] / r.sparse[p]:.1f} | **{r.speedup(p):.2f}x**"
                 for p in ("prefill", "decode")]
        lines.append(f"| {r.case} | {r.threads} | {' | '.join(cells)} |")
    return "\n".join(lines)


def model(dense: nn.Module, compiled: nn.Module, call: Call, case: str, runs: int = 20,
          threads: Sequence[int] = THREADS, peers_of: Optional[nn.Module] = None) -> list[Timing]:
    """One call of ``dense`` vs ``compiled`` at each thread count; with ``peers_of`` (the user's model, masks
    attached), its peers too (`sparsecc.tooling.peers`: onnxruntime dense and condensed, OpenVINO f32 and its
    default precision), each built for that thread count, its output checked against ``dense`` at the tolerance
    of its precision before it is timed, in the same interleaved rounds."""
    import tempfile
    from pathlib import Path

    from sparsecc.tooling import peers

    rows = []
    for n in threads:
        torch.set_num_threads(n)
        fns = {"dense": lambda: call(dense), "sparse": lambda: call(compiled)}
        invalid: dict[str, str] = {}
        with tempfile.TemporaryDirectory() as tmp:
            found = peers.peers(peers_of, call, Path(tmp), n) if peers_of is not None else []
        if found:
            with torch.no_grad():
                expected = call(dense)
            for peer in found:
                invalid_why = peer.unavailable or _differs(peer, call, expected)
                if invalid_why:
                    invalid[peer.label] = invalid_why
                else:
                    fns[peer.label] = lambda fn=peer.fn: call(fn)
        with torch.no_grad():
            t = medians(fns, runs, settle=SETTLE if len(fns) > 2 else 0)     # peers: other thread pools
        rows.append(Timing(case, n, {"call": t.pop("dense")}, {"call": t.pop("sparse")}, peers=t,
                           peers_invalid=invalid))
    return rows


def _differs(peer: Any, call: Call, expected: Any) -> str:
    """Why ``peer``'s output on ``call`` does not stand for ``expected`` (its precision's tolerance), or ""."""
    from torch.utils import _pytree as pytree

    from sparsecc.core.compare import compare
    from sparsecc.tooling import peers

    with torch.no_grad():
        got = pytree.tree_leaves(call(peer.fn))
    want = pytree.tree_leaves(expected)
    if len(got) != len(want):
        return f"{len(got)} outputs, the model has {len(want)}"
    for i, (a, e) in enumerate(zip(got, want)):
        stat = compare(f"output {i}", a, e, peers.tolerance(peer.precision))
        if not stat.ok:
            return str(stat)
    return ""


def model_table(rows: list[Timing], label: str = "sparsecc") -> str:
    """dense vs sparsecc (``label``: how it was compiled, ``sparsecc (bf16, fused)``) per thread count, then each
    peer's time and speed-up over dense (or why it has none)."""
    others = list(dict.fromkeys(p for r in rows for p in (*r.peers, *r.peers_invalid)))
    lines = [f"| model | threads | dense | {label} | speed-up |" + "".join(f" {p} |" for p in others),
             "|---|---|---|---|---|" + "---|" * len(others)]
    for r in rows:
        cells = [f"{r.peers[p] * 1e3:.2f} ms ({r.dense['call'] / r.peers[p]:.2f}x)" if p in r.peers
                 else f"not run: {r.peers_invalid.get(p, 'not built')}"[:120] for p in others]
        lines.append(f"| {r.case} | {r.threads} | {r.dense['call'] * 1e3:.2f} ms | {r.sparse['call'] * 1e3:.2f} ms | "
                     f"**{r.speedup('call'):.2f}x** |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def encoder(runs: int = 20, threads: Sequence[int] = THREADS, lengths: Sequence[int] = (16, 128),
            structures: Sequence[str] = ("fanin:0.9", "2:4"), log: Callable[[str], None] = lambda _: None,
            dtype: str = "fp32", fuse: bool = False) -> list[Timing]:
    """all-MiniLM-L6-v2 (trained weights, cast to ``dtype``), encoder layers sparsified by magnitude, one
    sequence per length; ``fuse``: compiled for each length with ``fuse=`` at ``threads`` (a fused model serves
    its example's shapes)."""
    from sparsecc.tooling import usermodel

    base, tokenizer = hf.minilm()
    base = base.to(DTYPES[dtype])
    text = " ".join(hf.SENTENCES * 40)
    rows = []
    for spec in structures:
        trained = sparsecc.masked_reference(base)
        usermodel.sparsify(trained, spec)
        dense = sparsecc.masked_reference(trained)
        batches = {n: dict(tokenizer([text], truncation=True, max_length=n, return_tensors="pt")) for n in lengths}
        log(f"encoder {spec}: compiling")       # one compile serves every length (choices per token count)
        shared = None if fuse else sparsecc.compile(trained, example_kwargs=batches[max(lengths)])
        for length, batch in batches.items():
            compiled = shared if shared is not None else \
                sparsecc.compile(trained, example_kwargs=batch, fuse=tuple(threads))
            rows += model(dense, compiled, Call((), batch), f"all-MiniLM-L6-v2 {spec}, {dtype}, {length} tokens",
                          runs, threads)
    return rows


def describe(rows: list[Timing]) -> list[dict[str, Any]]:
    """The rows as JSON-ready records."""
    return [r.__dict__ for r in rows]
