"""One equivalence check used everywhere: compiled vs the user's model as the user runs it (a copy with its
hooks and parametrizations live) end to end, and every condensed layer vs its dense op on the masked weights.
When the end-to-end check fails, the masked reference sparsecc rebuilt is compared with the user's model module
by module, so a rebuild that went wrong (a mask baked into a tensor other modules share) is named, not hidden.
The comparison itself and its tolerances are `sparsecc.core.compare`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsecc.core.compare import _TINY, NON_FINITE, TOLERANCE, compare, flatten, flatten_output  # noqa: F401
from sparsecc.core.errors import InputError, SparseccError
from sparsecc.core.inputs import Call
from sparsecc.core.layers import CondensedLayer, record_first_calls
from sparsecc.core.report import ErrorStat


def _redraw(t: Any) -> Any:
    return torch.randn_like(t) if isinstance(t, Tensor) and t.is_floating_point() else t


def random_like(inputs: Any) -> Any:
    """Fresh inputs of the same shapes (a `Call` or a pytree): floats redrawn from N(0,1), everything else
    (token ids, masks) reused."""
    return inputs.map(_redraw) if isinstance(inputs, Call) else pytree.tree_map(_redraw, inputs)


def input_sets(inputs: Call) -> list[Call]:
    """What validation runs: the example call, and one with its float inputs redrawn (when it has any: a call
    of token ids alone would only run again)."""
    floats = any(t.is_floating_point() for t in inputs.tensors())
    return [inputs, random_like(inputs)] if floats else [inputs]


@dataclass
class Validation:
    end_to_end: list[ErrorStat]
    layers: dict[str, ErrorStat]
    positions: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.end_to_end) and all(s.ok for s in self.layers.values())

    def worst_layer(self) -> Optional[tuple[str, ErrorStat]]:
        if not self.layers:
            return None
        return max(self.layers.items(), key=lambda kv: kv[1].max_abs / max(kv[1].tolerance, _TINY))

    rebuild_differs: list[str] = field(default_factory=list)   # modules where the rebuilt reference differs
    rebuild_checked: bool = False

    def message(self) -> str:
        bad = [str(s) for s in self.end_to_end if not s.ok]
        worst = self.worst_layer()
        parts = ["compiled model differs from the model as you run it"]
        parts.append("end to end: " + ("; ".join(bad) if bad else "within tolerance"))
        if worst:
            parts.append(f"worst layer {worst[0]}: {worst[1]}")
        if self.rebuild_differs:
            parts.append("the masked reference sparsecc rebuilt already differs from your model at "
                         f"{', '.join(self.rebuild_differs)} (please report this with the model)")
        elif any(s.detail == NON_FINITE for s in self.end_to_end):
            parts.append("your model's own output is not finite on these inputs (validation also draws random "
                         "N(0,1) inputs of the example's shapes): check it on finite, in-range inputs")
        elif self.rebuild_checked and all(stat.ok for stat in self.layers.values()):
            parts.append("observed module by module (with forward hooks attached) your model agrees with the "
                         "masked rebuild, so the difference comes from code that runs only without hooks: a "
                         "fused fast path (nn.TransformerEncoderLayer, nn.MultiheadAttention under no_grad) that "
                         "reads its submodules' weights directly, e.g. the dense weight of a sparsifying module")
        return "; ".join(parts)


def _merge(a: Optional[ErrorStat], b: ErrorStat) -> ErrorStat:
    if a is None:
        return b
    return b if (not b.ok and a.ok) or b.max_abs / max(b.tolerance, _TINY) > a.max_abs / max(a.tolerance, _TINY) \
        else a


def _positions_hooks(model: nn.Module, layers: dict[str, Any], positions: dict[str, int]) -> list:
    """Record output positions (tokens or N*H*W) of each analysed layer, on the compiled model or a masked
    copy; never on the user's model, where a hook changes what runs (torch's fused transformer paths are
    skipped when hooks are attached). Attention calls its out_proj functionally, so the attention module's
    hook speaks for both of its projections."""
    hooks = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, CondensedLayer):
            def hook(m, args, out, fqn=mod.weight_fqn, rows=mod.weight_shape[0]):
                positions.setdefault(fqn, out.numel() // rows)
        elif isinstance(mod, nn.MultiheadAttention):
            names = [n for n in (f"{prefix}in_proj_weight", f"{prefix}out_proj.weight") if n in layers]

            def hook(m, args, out, names=names, e=mod.embed_dim):
                for n in names:
                    positions.setdefault(n, args[0].numel() // e)
        elif f"{prefix}weight" in layers:
            def hook(m, args, out, fqn=f"{prefix}weight", rows=layers[f"{prefix}weight"].mask.shape[0]):
                if isinstance(out, Tensor):
                    positions.setdefault(fqn, out.numel() // rows)
        else:
            continue
        hooks.append(mod.register_forward_hook(hook))
    return hooks


def _module_outputs(model: nn.Module, inputs: Call) -> dict[str, list[Tensor]]:
    """Each module's tensor outputs on its first call, in call order (copies: later in-place ops can't touch
    them)."""
    return record_first_calls(model, inputs, model.named_modules(), lambda m, args, out: [
        t.detach().clone() for t in pytree.tree_leaves(out) if isinstance(t, Tensor)])


def rebuild_differences(user: nn.Module, rebuilt: nn.Module, inputs: Call, limit: int = 5) -> list[str]:
    """Modules (first ``limit``, in call order) whose outputs differ between the user's model and the masked
    reference sparsecc rebuilt from it: where a rebuild went wrong."""
    want, got = _module_outputs(user, inputs), _module_outputs(rebuilt, inputs)
    differ = []
    for name, outs in want.items():
        mine = got.get(name)
        if mine is None or len(mine) != len(outs):
            continue
        if not all(compare(name, a, e).ok for a, e in zip(mine, outs)):
            differ.append(name)
    inner = [n for n in differ if n and not any(o.startswith(f"{n}.") for o in differ)]
    return (inner or [n or "<root>" for n in differ])[:limit]


def _check_layer(mod: CondensedLayer, weights_from: nn.Module, x: Tensor, y: Tensor) -> ErrorStat:
    """One condensed layer's output against the dense op on the same input with the weights it came from.
    A layer run in another dtype than its weights (``precision=``) is checked in the dtype it ran in: the
    question here is whether the kernel computes the layer, not how much precision the cast costs."""
    w = weights_from.get_parameter(mod.weight_fqn)
    b = weights_from.get_parameter(mod.bias_fqn) if mod.bias_fqn else None
    if y.dtype != w.dtype:
        x, w, b = (t.to(y.dtype) if t is not None else None for t in (x, w, b))
    return compare(mod.weight_fqn, y, mod.dense_op()(x, w, b))


def users_call(reference: nn.Module, inputs: Call) -> Any:
    """The user's model on ``inputs``; where it fails, an `InputError` saying so (the failure is the model's, not
    sparsecc's: a model whose weights and inputs disagree in dtype after ``.to()``, say)."""
    try:
        return inputs(reference)
    except SparseccError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's own forward is reported as such
        text = str(exc)
        hint = (" One way this happens: a model cast with .to() after torch.nn.utils.prune keeps each pruned weight "
                "in its old dtype until its module runs, and nn.MultiheadAttention never runs its out_proj; cast "
                "before pruning, or call prune.remove first") if "dtype" in text else \
            " Check the example inputs' shapes and dtypes against what the model's first layers take"
        raise InputError(f"your model itself fails on these inputs ({type(exc).__name__}: {text[:300]}): "
                         f"sparsecc compares with the model as you run it, so it must run as called.{hint}") from exc


def _compare_outputs(actual: Any, expected: Any, tolerance: Optional[float], held_in: Optional[torch.dtype],
                     end_to_end: dict[int, ErrorStat]) -> None:
    """One call's outputs, leaf by leaf, merged into ``end_to_end`` (by leaf; -1: the structures differ)."""
    want, got = flatten_output(expected), flatten_output(actual)
    if want.structure != got.structure:
        end_to_end[-1] = ErrorStat("output", float("inf"), float("inf"), 0.0, False,
                                   f"output structure {got.structure} != reference {want.structure}")
        return
    names = want.names
    for i, (a, e) in enumerate(zip(got.flat, want.flat)):
        what = f"output {i}" + (f" ({names[i]})" if names[i] and names[i] != f"[{i}]" else "")
        if got.held[i] and _held(a, e, held_in):
            what, a = f"{what} (held in {str(held_in).removeprefix('torch.')})", a.to(e.dtype)
        stat = compare(what, a, e, tolerance)
        if isinstance(e, Tensor) or not stat.ok or i in end_to_end:   # equal flags and devices: quiet
            end_to_end[i] = _merge(end_to_end.get(i), stat)


def _held(actual: Any, expected: Any, dtype: Optional[torch.dtype]) -> bool:
    """Whether ``actual`` is a state tensor a ``precision=`` run keeps in ``dtype`` where the reference has a
    wider float."""
    return dtype is not None and isinstance(actual, Tensor) and isinstance(expected, Tensor) \
        and actual.dtype == dtype and expected.is_floating_point() and expected.dtype != dtype


def run_validation(reference: nn.Module, compiled: nn.Module, input_sets: Sequence[Any],
                   layers: Optional[dict[str, Any]] = None, tolerance: Optional[float] = None,
                   weights_from: Optional[nn.Module] = None, rebuilt: Optional[nn.Module] = None,
                   held_in: Optional[torch.dtype] = None, layer_checks: bool = True) -> Validation:
    """Run both models on every input set; compare outputs and every condensed layer on its own input.
    ``reference`` is what the outputs must equal: the user's model as run. ``tolerance`` replaces the per-dtype
    one end to end (an fp16 engine checked against fp32 outputs). Layers are checked against the weights of
    ``weights_from`` (default ``reference``; the masked rebuild, or the narrowed copy when channels were
    removed, whose layers have other shapes). If the outputs differ, ``rebuilt`` (the masked rebuild) is
    compared with ``reference`` module by module. Each input set is a `Call` or a tuple of positional inputs.
    ``held_in``: the dtype a ``precision=`` run keeps the state objects of its outputs in (a Hugging Face KV
    cache, which its next call reads back: converting it on every decode step would copy the whole cache);
    their tensors in that dtype are compared by value in the reference's dtype, and say so. ``layer_checks``:
    False compares the outputs only (a fused graph, whose layers were each checked at compile: ``reference``'s
    weights may be prune hooks' attributes rather than parameters there)."""
    input_sets = [Call.of(inputs) for inputs in input_sets]
    weights_from = reference if weights_from is None else weights_from
    condensed = {m.weight_fqn: m for m in compiled.modules() if isinstance(m, CondensedLayer)} if layer_checks \
        else {}
    end_to_end: dict[int, ErrorStat] = {}
    per_layer: dict[str, ErrorStat] = {}
    positions: dict[str, int] = {}
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    # Copies: an in-place op after the layer (ReLU(inplace=True) once a BatchNorm is folded away) would
    # otherwise change what was captured.
    hooks = [m.register_forward_hook(lambda m, a, o, f=f: captured.__setitem__(f, (a[0].clone(), o.clone())))
             for f, m in condensed.items()]
    ref_hooks = _positions_hooks(compiled, layers, positions) if layers else []
    try:
        with torch.no_grad():
            for inputs in input_sets:
                captured.clear()
                expected = users_call(reference, inputs)
                actual = inputs(compiled)
                _compare_outputs(actual, expected, tolerance, held_in, end_to_end)
                for fqn, (x, y) in captured.items():
                    per_layer[fqn] = _merge(per_layer.get(fqn), _check_layer(condensed[fqn], weights_from, x, y))
    finally:
        for h in hooks + ref_hooks:
            h.remove()
    missing = [f for f in layers or {} if f not in positions]
    if missing and weights_from is not reference and input_sets:
        hooks = _positions_hooks(weights_from, {f: layers[f] for f in missing}, positions)
        try:
            with torch.no_grad():
                input_sets[0](weights_from)
        finally:
            for h in hooks:
                h.remove()
    result = Validation(list(end_to_end.values()), per_layer, positions)
    if rebuilt is not None and rebuilt is not reference and not all(s.ok for s in result.end_to_end):
        result.rebuild_differs = rebuild_differences(reference, rebuilt, input_sets[0])
        result.rebuild_checked = True
    return result
