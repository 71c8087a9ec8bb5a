"""`sparsify`: make a dense model sparse in the structures sparsecc accelerates, ready to fine-tune.

- ``"fanin"`` (SRigL's constant fan-in): each output row keeps its ``k`` largest ``|w|``; ``k`` comes from the
  layer's density — the same for every layer (``distribution="uniform"``) or Erdős–Rényi-Kernel
  (``"erk"``, RigL / SWAT: density proportional to ``sum(shape) / prod(shape)``, scaled so the kept weights
  total the target, layers that would exceed 1 kept dense). ``ablate`` zeroes the rows whose kept weights
  have the smallest L2 norm (SRigL's ablated neurons).
- ``"2:4"`` (NVIDIA ASP): the 2 largest of every 4 weights along the input dimension. With ``permute`` the
  input channels are first permuted to keep more magnitude, and the producer's output channels (and any
  BatchNorm between) are permuted the same way, so the function is unchanged before pruning. A layer whose
  input does not come from exactly one Linear/Conv2d through elementwise ops is not permuted (the report
  says why).

Masks are attached with ``torch.nn.utils.parametrize`` (a `Mask` parametrization holding ``mask``), which
`sparsecc.compile` reads and fine-tuning keeps applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sparsecc.capture.masks import Mask, transposed_weights, weight_slots
from sparsecc.core.errors import InputError

Selector = Callable[[str, str], bool]   # (weight fqn, layer kind) -> sparsify it?


def selected_weights(model: nn.Module, include: Optional[Selector]) -> dict[str, torch.Tensor]:
    """The selected weights as ``[out, in, ...]`` views (a transformers Conv1D's ``[in, out]`` weight transposed):
    masks are made along the input axis; `user_layout` puts them back."""
    out = {}
    transposed = transposed_weights(model)
    for module, attr, _, kind in weight_slots(model):
        fqn = f"{module}.{attr}" if module else attr
        if include is None or include(fqn, kind):
            w = getattr(model.get_submodule(module), attr).detach()
            out[fqn] = w.t() if fqn in transposed else w
    return out


def user_layout(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks made on `selected_weights` in the layout of the model's own weights."""
    transposed = transposed_weights(model)
    return {fqn: m.t() if fqn in transposed else m for fqn, m in masks.items()}


def fanin_mask(weight: torch.Tensor, sparsity: float, ablate: float = 0.0,
               generator: Optional[torch.Generator] = None, weakest: bool = False) -> torch.Tensor:
    """Constant fan-in: each live row keeps its ``round((1-sparsity)*fan_in)`` largest |w|; a fraction
    ``ablate`` of rows is all zero, as SRigL's ablated neurons: chosen at random, or with ``weakest`` the rows
    whose kept weights have the least energy (what `sparsecc.sparsify` ablates)."""
    rows = weight.detach().reshape(weight.shape[0], -1).abs()
    k = min(rows.shape[1], max(1, round((1.0 - sparsity) * rows.shape[1])))
    mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, rows.topk(k, dim=1).indices, True)
    n_ablate = int(round(ablate * rows.shape[0]))
    if n_ablate and weakest:
        mask[(rows * mask).pow(2).sum(1).topk(n_ablate, largest=False).indices] = False
    elif n_ablate:
        mask[torch.randperm(rows.shape[0], generator=generator)[:n_ablate]] = False
    return mask.reshape(weight.shape)


def nm_mask(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 along the input axis (Linear dim 1, Conv2d channel dim)."""
    w = weight if weight.dim() == 2 else weight.permute(0, 2, 3, 1)
    groups = w.abs().reshape(*w.shape[:-1], -1, 4)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    mask = mask.reshape(w.shape)
    return mask if weight.dim() == 2 else mask.permute(0, 3, 1, 2)


STRUCTURES = ("fanin", "2:4")
DISTRIBUTIONS = ("uniform", "erk")
#: Swap rounds of the permutation search per layer: each tries every partner of one channel.
PERMUTE_ROUNDS = 64


@dataclass(frozen=True)
class SparsifiedLayer:
    fqn: str
    structure: str            # "fan-in k=…" or "2:4"
    density: float            # kept fraction of the weight
    target_density: float     # what the distribution asked for (before rounding to whole weights per row)
    kept_magnitude: float     # fraction of sum |w| kept
    kept_without_permutation: Optional[float] = None    # 2:4 only
    permutation: str = ""     # 2:4: the producer permuted with it, or why none was


@dataclass
class SparsifyReport:
    structure: str
    layers: list[SparsifiedLayer] = field(default_factory=list)
    #: Layers left dense because they cannot take the structure, with the reason (NVIDIA ASP skips them too).
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def density(self) -> float:
        """Kept fraction over all sparsified weights."""
        total = sum(self._sizes.values())
        return sum(lay.density * self._sizes[lay.fqn] for lay in self.layers) / total if total else 1.0

    _sizes: dict[str, int] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        lines = [f"{'layer':40} {'structure':14} {'density':>8} {'|w| kept':>9}  permutation"]
        for lay in self.layers:
            kept = f"{lay.kept_magnitude:.1%}"
            if lay.kept_without_permutation is not None:
                kept += f" (unpermuted {lay.kept_without_permutation:.1%})"
            lines.append(f"{lay.fqn:40} {lay.structure:14} {lay.density:8.1%} {kept:>9}  {lay.permutation}")
        for fqn, why in self.skipped.items():
            lines.append(f"{fqn:40} skipped: {why}")
        lines.append(f"{len(self.layers)} layers sparsified ({self.structure}), overall density {self.density:.1%}"
                     + (f"; {len(self.skipped)} skipped" if self.skipped else ""))
        return "\n".join(lines)


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel: density_l = min(1, eps * sum(shape_l) / prod(shape_l)), eps solved so that
    ``sum(density_l * numel_l) == density * sum(numel_l)``."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    score = {n: sum(s) / numel[n] for n, s in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        eps = (budget - sum(numel[n] for n in dense)) / sum(score[n] * numel[n] for n in free)
        over = {n for n in free if eps * score[n] > 1.0}
        if not over:
            return {n: 1.0 if n in dense else eps * score[n] for n in shapes}
        dense |= over


# -- 2:4 with input-channel permutation -------------------------------------------------------------------------

def _importance(weight: Tensor) -> Tensor:
    """``|w|`` as ``[rows, C]`` with the input channel last: 2:4 groups are 4 consecutive channels per row
    (for a Conv2d, per output channel and kernel position)."""
    w = weight.detach().abs()
    return w if w.dim() == 2 else w.permute(0, 2, 3, 1).reshape(-1, w.shape[1])


def _kept(m: Tensor) -> Tensor:
    """Sum of the 2 largest of each group of 4 along the last axis (any leading axes)."""
    return m.reshape(*m.shape[:-1], -1, 4).topk(2, dim=-1).values.sum((-1, -2))


def search_permutation(weight: Tensor, rounds: int = PERMUTE_ROUNDS, seed: int = 0, sample_rows: int = 256) -> Tensor:
    """An input-channel permutation that keeps at least as much magnitude under 2:4 as none: greedy swaps
    from the identity. Each round scores every partner of one channel on a sample of rows, then applies the
    best swap only if it gains on all rows, so the kept magnitude never decreases."""
    m = _importance(weight)
    rows, channels = m.shape
    perm = torch.arange(channels)
    g = torch.Generator().manual_seed(seed)
    every = torch.arange(channels)
    for _ in range(rounds):
        i = int(torch.randint(channels, (1,), generator=g))
        sample = m if rows <= sample_rows else m[torch.randperm(rows, generator=g)[:sample_rows]]
        j = int(_swap_gains(sample[:, perm], i, every).argmax())
        if i // 4 != j // 4 and float(_swap_gains(m[:, perm], i, torch.tensor([j]))[0]) > 0.0:
            perm[[i, j]] = perm[[j, i]]
    return perm


def _swap_gains(cur: Tensor, i: int, partners: Tensor) -> Tensor:
    """Kept magnitude gained by swapping channel ``i`` with each of ``partners`` (0 within i's own group)."""
    gi = i // 4
    own = cur[:, 4 * gi:4 * gi + 4]
    groups_j = cur.reshape(cur.shape[0], -1, 4)[:, partners // 4]                 # [rows, P, 4]
    new_j = groups_j.clone()
    new_j[:, torch.arange(len(partners)), partners % 4] = own[:, i % 4, None].expand(-1, len(partners))
    new_i = own[:, None, :].expand(-1, len(partners), -1).clone()
    new_i[:, :, i % 4] = cur[:, partners]
    top2 = lambda t: t.topk(2, dim=-1).values.sum((0, 2))  # noqa: E731
    gain = top2(new_i) + top2(new_j) - own.topk(2, dim=-1).values.sum() - top2(groups_j)
    return torch.where(partners // 4 == gi, torch.zeros_like(gain), gain)


_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ReLU6, nn.Hardswish, nn.Dropout,
                nn.Identity)
_ELEMENTWISE_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.sigmoid,
                          torch.tanh, torch.nn.functional.silu, torch.nn.functional.dropout}


def _producers(model: nn.Module) -> tuple[dict[str, tuple[str, list[str]]], dict[str, str]]:
    """For each Linear/Conv2d whose input is the output of exactly one Linear/Conv2d through elementwise ops
    and BatchNorms (each used once): consumer -> (producer, BatchNorms between); for the others, why not."""
    import torch.fx

    weights = {name for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no producer is known
        return {}, {name: f"model not traceable by torch.fx ({type(exc).__name__})" for name in weights}
    found: dict[str, tuple[str, list[str]]] = {}
    why: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in weights:
            continue
        norms: list[str] = []
        src = node.args[0] if node.args else None
        while isinstance(src, torch.fx.Node) and len(src.users) == 1:
            mod = model.get_submodule(src.target) if src.op == "call_module" else None
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                norms.append(src.target)
            elif not (isinstance(mod, _ELEMENTWISE) or (src.op == "call_function" and src.target in
                                                         _ELEMENTWISE_FUNCTIONS)):
                break
            src = src.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and src.target in weights
                and len(src.users) == 1):
            found[node.target] = (src.target, norms)
        else:
            why[node.target] = "input not from a single Linear/Conv2d through elementwise ops"
    return found, why


def _permute_pair(model: nn.Module, consumer: str, producer: str, norms: list[str], perm: Tensor) -> None:
    with torch.no_grad():
        c = model.get_submodule(consumer)
        c.weight.copy_(c.weight[:, perm])
        p = model.get_submodule(producer)
        p.weight.copy_(p.weight[perm])
        if p.bias is not None:
            p.bias.copy_(p.bias[perm])
        for name in norms:
            bn = model.get_submodule(name)
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                if t is not None:
                    t.copy_(t[perm])


def _groups_ok(model: nn.Module, *names: str) -> bool:
    return all(getattr(model.get_submodule(n), "groups", 1) == 1 for n in names)


# -- entry point ---------------------------------------------------------------------------------------------

def sparsify(model: nn.Module, structure: str, *, sparsity: float = 0.9, distribution: str = "uniform",
             ablate: float = 0.0, permute: bool = True, include: Optional[Selector] = None) -> SparsifyReport:
    """Attach magnitude masks of ``structure`` to ``model``'s Linear/Conv2d weights (in place; ``include(fqn,
    kind)`` picks which) and report what each kept. See the module docstring for the recipes."""
    if structure not in STRUCTURES:
        raise InputError(f"structure={structure!r}: choose one of {STRUCTURES}")
    if distribution not in DISTRIBUTIONS:
        raise InputError(f"distribution={distribution!r}: choose one of {DISTRIBUTIONS}")
    if not 0.0 <= sparsity < 1.0 or not 0.0 <= ablate < 1.0:
        raise InputError(f"sparsity={sparsity}, ablate={ablate}: fractions in [0, 1)")
    targets = {fqn: w for fqn, w in selected_weights(model, include).items() if fqn.endswith(".weight")}
    for fqn in targets:
        owner = model.get_submodule(fqn.rpartition(".")[0])
        if parametrize.is_parametrized(owner, "weight") or hasattr(owner, "weight_mask"):
            raise InputError(f"{fqn} already has a mask (parametrization or prune hook); remove it first")
    uniform = structure == "fanin" and distribution == "uniform" and ablate == 0.0
    skipped = {fqn: why for fqn, w in targets.items() if (why := _cannot_take(w, structure, sparsity, uniform))}
    if skipped and include is not None:       # layers the caller chose by name: refuse, naming the first
        fqn, why = next(iter(skipped.items()))
        raise InputError(f"{fqn}: {why} (leave this layer out with include=)")
    if skipped and len(skipped) == len(targets):
        raise InputError(f"no layer can take {structure}: " + "; ".join(f"{f}: {w}" for f, w in skipped.items()))
    targets = {fqn: w for fqn, w in targets.items() if fqn not in skipped}
    report = SparsifyReport(structure, skipped=skipped, _sizes={fqn: w.numel() for fqn, w in targets.items()})
    masks: dict[str, Tensor] = {}
    if structure == "fanin":
        shapes = {fqn: tuple(w.shape) for fqn, w in targets.items()}
        density = (erk_densities(shapes, 1.0 - sparsity) if distribution == "erk"
                   else {fqn: 1.0 - sparsity for fqn in targets})
        for fqn, w in targets.items():
            masks[fqn] = fanin_mask(w, 1.0 - density[fqn], ablate, weakest=True)
            k = int(masks[fqn].reshape(w.shape[0], -1).sum(1).max())
            report.layers.append(_layer(fqn, w, masks[fqn], f"fan-in k={k}", density[fqn]))
    else:
        _two_four(model, targets, masks, report, permute)
    for fqn, mask in user_layout(model, masks).items():
        parametrize.register_parametrization(model.get_submodule(fqn.rpartition(".")[0]), "weight", Mask(mask))
    return report


def _cannot_take(w: Tensor, structure: str, sparsity: float, uniform: bool) -> str:
    """Why a weight (``[out, in, ...]`` view) cannot take ``structure``, or "" when it can: 2:4 needs whole
    groups of 4 along the input (a 3-channel image stem has none); a uniform constant fan-in without ablation
    must remove at least one input per row (a fan-in of 1 cannot lose any; ERK may keep a layer dense on
    purpose)."""
    if structure == "2:4" and w.shape[1] % 4:
        return f"{w.shape[1]} input channels is not a multiple of 4; 2:4 needs groups of 4 along the input"
    fan_in = w[0].numel()
    if uniform and fan_in - max(1, round((1.0 - sparsity) * fan_in)) < 1:
        return f"fan-in {fan_in} keeps every input at {sparsity:.0%} sparsity"
    return ""


def _layer(fqn: str, w: Tensor, mask: Tensor, structure: str, target: float, **extra) -> SparsifiedLayer:
    w = w.detach().abs()
    return SparsifiedLayer(fqn, structure, float(mask.float().mean()), target,
                           float((w * mask).sum()) / (float(w.sum()) or 1.0), **extra)


def _two_four(model: nn.Module, targets: dict[str, Tensor], masks: dict[str, Tensor], report: SparsifyReport,
              permute: bool) -> None:
    """Permutations first, all of them (a consumer's permutation moves its producer's rows), then masks."""
    pairs, why = _producers(model) if permute else ({}, {})
    modules = {fqn.rpartition(".")[0]: fqn for fqn in targets}
    unpermuted: dict[str, float] = {}
    notes: dict[str, str] = {}
    for module, fqn in modules.items():
        w = targets[fqn]            # [out, in] view: follows the permutations made in place
        unpermuted[fqn] = _layer(fqn, w, nm_mask(w.detach()), "2:4", 0.5).kept_magnitude
        notes[fqn] = "off" if not permute else why.get(module, "")
        if not permute or module not in pairs:
            continue
        producer, norms = pairs[module]
        if not _groups_ok(model, module, producer):
            notes[fqn] = "grouped convolution: channels cannot move across groups"
            continue
        perm = search_permutation(w)
        if torch.equal(perm, torch.arange(len(perm))):
            notes[fqn] = f"identity (no swap gained; producer {producer})"
            continue
        _permute_pair(model, module, producer, norms, perm)
        notes[fqn] = f"with {producer}" + (f" via {', '.join(norms)}" if norms else "")
    for module, fqn in modules.items():
        w = targets[fqn]
        masks[fqn] = nm_mask(w)
        report.layers.append(_layer(fqn, w, masks[fqn], "2:4", 0.5, kept_without_permutation=unpermuted[fqn],
                                    permutation=notes[fqn]))
