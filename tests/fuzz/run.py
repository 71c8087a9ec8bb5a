"""Run fuzz cases on every backend and compare with the user's model as the user calls it.

Outcomes: ``pass``; ``refused`` — a `SparseccError` that names what it cannot do (a valid answer, counted
with its reason); ``fail`` — wrong numbers, or any other exception (a crash from inside is a bug).

Tolerance, ``max|got - want| <= tol * max|want|`` per output tensor: 1e-4 for the op runtimes and the
graph paths (fp32 sums of the same products in another order), 1e-4 for onnxruntime and the TVM library
(also fp32)."""

from __future__ import annotations

import copy
import os
import random
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

import sparsecc
from sparsecc import dynamo as sparsecc_dynamo
from sparsecc.compiler.validation import compare
from sparsecc.core.errors import SparseccError
from sparsecc.core.layers import CondensedLayer, exact_bf16
from tests.fuzz.generate import Case

#: float32's; other dtypes are compared at validation's tolerance for theirs.
TOLERANCE = 1e-4


@dataclass
class Outcome:
    path: str
    status: str          # pass | refused | fail
    detail: str = ""


class Mismatch(AssertionError):
    pass


def check(what: str, got: Any, want: Any, tolerance: float = TOLERANCE) -> None:
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    if got_spec != want_spec:
        raise Mismatch(f"{what}: output structure {got_spec} != {want_spec}")
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        if isinstance(w, torch.Tensor) and isinstance(g, torch.Tensor) and w.is_floating_point() and \
                g.shape == w.shape and not bool(torch.isfinite(w).all()):
            for name, test in (("NaN", torch.isnan), ("Inf", torch.isinf)):
                if not torch.equal(test(g), test(w)):
                    raise Mismatch(f"{what} output {i}: {name} at other positions than in the user's model")
            finite = torch.isfinite(w)
            g, w = g[finite], w[finite]
        tol = tolerance if not isinstance(w, torch.Tensor) or w.dtype in (torch.float32, torch.float64) else None
        stat = compare(f"{what} output {i}", g, w, tol)
        if not stat.ok:
            raise Mismatch(str(stat))


def _expected(case: Case, inputs: tuple) -> Any:
    with torch.no_grad():
        return case.user_model()(*inputs)


def _call(model: Callable, inputs: tuple) -> Any:
    with torch.no_grad():
        return model(*inputs)


def _compiled(case: Case, backend: str) -> sparsecc.CompiledModel:
    return sparsecc.compile(case.model, case.inputs, masks=case.masks, backend=backend)


# -- metamorphic checks: exact expectations on the compiled model itself ----------------------------------

def _permute_pairs(layer: CondensedLayer, rng: random.Random) -> None:
    """Shuffle each row's (value, index) pairs and the order of the rows: the same function."""
    if "indices" not in layer._buffers:
        return
    values, indices, rows = layer.values, layer.indices, layer.rows
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    order = torch.rand(values.shape, generator=gen).argsort(1)
    values, indices = values.gather(1, order), indices.gather(1, order.to(torch.int64)).to(indices.dtype)
    perm = torch.randperm(values.shape[0], generator=gen)
    rows = (perm if rows is None else rows[perm]).to(torch.int64)
    layer.values, layer.indices, layer.rows = values[perm].contiguous(), indices[perm].contiguous(), rows


def non_finite(case: Case, compiled: sparsecc.CompiledModel) -> None:
    """A NaN or an Inf at one seeded position of the first float input reaches the outputs it reaches in the
    user's model, its bf16 GEMMs and convolutions exact about where NaN goes (`sparsecc.core.layers.exact_bf16`:
    torch's own spread NaN to a neighbouring row for some widths, and narrowing changes widths)."""
    inputs = list(case.fresh_inputs())
    i = next((i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    if i is None:
        return
    rng = random.Random(case.seed)
    flat = inputs[i].view(-1)
    flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    with exact_bf16():
        expected = _expected(case, tuple(inputs))
    check("non-finite input", _call(compiled, tuple(inputs)), expected)


def metamorphic(case: Case, compiled: sparsecc.CompiledModel) -> None:
    inputs = case.fresh_inputs()
    whole = _call(compiled, inputs)
    batch = next(t.shape[0] for t in inputs if isinstance(t, torch.Tensor))
    if batch > 1:
        singles = [_call(compiled, tuple(t[i:i + 1] if isinstance(t, torch.Tensor) else t for t in inputs))
                   for i in range(batch)]
        joined = pytree.tree_map(lambda *xs: torch.cat(xs), *singles)
        check("batch split into single calls", joined, whole)
    permuted = copy.deepcopy(compiled)
    rng = random.Random(case.seed)
    for mod in permuted.modules():
        if isinstance(mod, CondensedLayer):
            _permute_pairs(mod, rng)
    check("(value, index) pairs and rows permuted", _call(permuted, inputs), whole)


# -- backends ------------------------------------------------------------------------------------------------

def op_runtime(backend: str) -> Callable[[Case, Path], None]:
    """The op runtimes run the case in its drawn dtype (the engines and exports in float32)."""
    def run(case: Case, tmp: Path) -> None:
        case = case.in_dtype()
        compiled = _compiled(case, backend)
        inputs = case.fresh_inputs()
        check(backend, _call(compiled, inputs), _expected(case, inputs))
        metamorphic(case, compiled)
        non_finite(case, compiled)
    return run


def onnxruntime_engine(case: Case, tmp: Path) -> None:
    compiled = _compiled(case, "onnxruntime")
    inputs = case.fresh_inputs()
    check("onnxruntime", _call(compiled, inputs), _expected(case, inputs))


def dynamo(case: Case, tmp: Path) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(case.user_model(), backend=sparsecc_dynamo.backend_with(inductor=False), dynamic=False)
    inputs = case.fresh_inputs()
    check("torch.compile(backend=sparsecc)", _call(compiled, inputs), _expected(case, inputs))
    torch._dynamo.reset()


def pt2(case: Case, tmp: Path) -> None:
    compiled = _compiled(case, "tvm")
    loaded = sparsecc.load(sparsecc.save(compiled, tmp / "m.pt2"))
    inputs = case.fresh_inputs()
    check(".pt2 save/load", loaded(*inputs), _expected(case, inputs))


def export_onnx(case: Case, tmp: Path) -> None:
    from sparsecc.runtimes.onnxruntime import engine as ort

    compiled = _compiled(case, "reference")
    exported = sparsecc.export_onnx(compiled, case.inputs, tmp / "m.onnx")
    session = ort.session(exported.path)
    inputs = case.fresh_inputs()
    feeds = {n: t.numpy() for n, t in zip(exported.input_names, inputs)}
    got = [torch.from_numpy(o) for o in session.run(None, feeds)]
    want = pytree.tree_leaves(_expected(case, inputs))
    check("export_onnx in onnxruntime", got, want)


def export_tvm(case: Case, tmp: Path) -> None:
    compiled = _compiled(case, "tvm")
    sparsecc.export_tvm(compiled, case.inputs, tmp / "m.so")
    lib = sparsecc.load_tvm(tmp / "m.so")
    inputs = case.fresh_inputs()      # the library is specialised on the example shapes
    got = lib(*inputs)
    got = [torch.as_tensor(o) for o in (got if isinstance(got, (list, tuple)) else [got])]
    check("export_tvm", got, pytree.tree_leaves(_expected(case, inputs)))


#: Backend name -> (runner, share of cases it runs: every case, or a seeded fraction).
BACKENDS: dict[str, tuple[Callable[[Case, Path], None], float]] = {
    "reference": (op_runtime("reference"), 1.0),
    "tvm": (op_runtime("tvm"), 1.0),
    "onnxruntime": (onnxruntime_engine, 0.2),
    "torch.compile": (dynamo, 0.15),
    "pt2": (pt2, 0.15),
    "export_onnx": (export_onnx, 0.15),
    "export_tvm": (export_tvm, 0.12),
}


def runs_on(seed: int, backend: str) -> bool:
    share = BACKENDS[backend][1]
    return share >= 1.0 or random.Random(f"{seed}/{backend}").random() < share


def run(case: Case, backend: str) -> Outcome:
    runner = BACKENDS[backend][0]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            runner(case, Path(tmp))
        except SparseccError as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            return Outcome(backend, "refused", f"{type(exc).__name__}: {first}")
        except Mismatch as exc:
            return Outcome(backend, "fail", f"wrong numbers: {exc}")
        except Exception as exc:  # noqa: BLE001 - anything else escaping sparsecc is a bug the fuzzer reports
            where = "".join(traceback.format_exception(exc)[-3:])[-600:]
            return Outcome(backend, "fail", f"{type(exc).__name__}: {str(exc)[:300]} | {where}")
    return Outcome(backend, "pass")


def work(seed: int, backends: list[str], journal: str) -> list[tuple[int, str, str, str, str]]:
    """One seed on every backend whose share it falls in (a worker's task in ``python -m tests.fuzz``):
    (seed, backend, status, detail, case). Each start is appended to ``journal`` first, so a case that kills
    its worker (a segfault) is named."""
    import warnings

    from tests.fuzz.generate import case

    warnings.simplefilter("ignore")
    results = []
    for backend in backends:
        if runs_on(seed, backend):
            with open(journal, "a") as f:
                f.write(f"{os.getpid()} {seed} {backend}\n")
            c = case(seed)
            outcome = run(c, backend)
            results.append((seed, backend, outcome.status, outcome.detail, str(c)))
    return results
