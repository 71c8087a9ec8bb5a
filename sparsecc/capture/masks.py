"""Mask discovery: turn a user's masked model into a plain reference model plus one boolean mask per weight.

Sources, first match wins per weight: an explicit ``masks={"fqn.weight": mask}`` dict, a
``torch.nn.utils.prune`` hook (``weight_orig`` * ``weight_mask``), a ``torch.nn.utils.parametrize``
parametrization holding a ``mask`` tensor (``torch.ao.pruning`` FakeSparsity), a sparsifying module that
folds itself (``sparsecc_fold()``, e.g. `sparsecc.swat.TopKLinear`), else the exact zeros of the weight.
The reference model has every hook and parametrization baked in, so ``weight`` *is* the masked weight. A
weight tensor that has other uses (tied parameters: an LM head sharing the embedding's tensor) is first given
its own copy there, so baking its mask in leaves the other uses as the user's model runs them. A second copy,
``user``, keeps the hooks and parametrizations live: end-to-end validation compares with it.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from sparsecc.core import reductions
from sparsecc.core.errors import MaskError, SparseccWarning, WeightError

log = logging.getLogger("sparsecc")

LayerKind = Literal["linear", "conv2d"]
MaskSource = Literal["masks=", "prune", "parametrize", "module", "zeros"]


@dataclass(frozen=True)
class Layer:
    """One analysable weight of the reference model: where it lives, its mask and where the mask came from."""

    fqn: str                    # parameter name, e.g. "encoder.layers.0.mlp.0.weight"
    module: str                 # owning module, e.g. "encoder.layers.0.mlp.0"
    bias: Optional[str]         # bias parameter name, if any
    kind: LayerKind
    mask: torch.Tensor          # bool, same shape as the weight
    source: MaskSource
    shared_with: tuple[str, ...] = ()   # other uses of the same tensor (tied weights), e.g. "emb.weight"


@dataclass(frozen=True)
class Prepared:
    reference: nn.Module        # eval-mode copy with masks baked in; never the user's object
    layers: dict[str, Layer]    # keyed by weight fqn
    was_training: bool
    user: Optional[nn.Module] = None    # eval-mode copy with hooks and parametrizations live: the model as run
    linearized: tuple[str, ...] = ()    # modules with a transposed weight that became nn.Linear (GPT-2's Conv1D)


def _linearize(model: nn.Module) -> tuple[str, ...]:
    """Replace every transposed-weight linear by the ``nn.Linear`` it is, its mask (prune hook or
    parametrization) carried over transposed as a prune hook; returns their names."""
    names = []
    for name, mod in list(model.named_modules()):
        if not name or not _is_transposed_linear(mod):
            continue
        mask, _ = _hook_mask(mod, "weight")
        owner, slot = _storage(mod, "weight")
        raw = getattr(owner, slot).detach()
        bias = getattr(mod, "bias", None)
        linear = nn.Linear(raw.shape[0], raw.shape[1], bias=bias is not None, device="meta")   # no init work
        linear.weight = nn.Parameter(raw.t().contiguous())
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone())
        if mask is not None:
            prune.custom_from_mask(linear, "weight", mask.t())
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, linear.train(mod.training))
        names.append(name)
    return tuple(names)


def _is_transposed_linear(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT, DistilGPT-2, ...): ``x @ weight + bias`` with ``weight`` of shape
    ``[in, out]`` -- a Linear with its weight transposed. Matched by name (transformers is optional), through
    the subclass parametrize makes of a parametrized module."""
    return (any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(mod).__mro__)
            and isinstance(getattr(mod, "weight", None), torch.Tensor) and getattr(mod, "weight").dim() == 2)


def transposed_weights(model: nn.Module) -> set[str]:
    """Names of the weights stored ``[in, out]`` (transformers' Conv1D): masks for them are in that layout."""
    return {_join(name, "weight") for name, mod in model.named_modules() if name and _is_transposed_linear(mod)}


def weight_slots(model: nn.Module) -> list[tuple[str, str, Optional[str], LayerKind]]:
    """(module fqn, weight attr, bias attr, kind) of every weight sparsecc analyses, before any stripping.
    A transposed-weight linear (`transposed_weights`) is a ``"linear"`` whose weight is ``[in, out]``."""
    slots: list[tuple[str, str, Optional[str], LayerKind]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or (name and _is_transposed_linear(mod)):
            slots.append((name, "weight", "bias", "linear"))
        elif isinstance(mod, nn.Conv2d):
            slots.append((name, "weight", "bias", "conv2d"))
        elif isinstance(mod, nn.MultiheadAttention) and mod._qkv_same_embed_dim:
            slots.append((name, "in_proj_weight", "in_proj_bias", "linear"))
    return slots


def _join(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _hook_mask(mod: nn.Module, attr: str) -> tuple[Optional[torch.Tensor], Optional[MaskSource]]:
    """The mask a prune hook or a parametrization holds for ``mod.attr``, if any."""
    buf = getattr(mod, f"{attr}_mask", None)
    if isinstance(buf, torch.Tensor) and isinstance(getattr(mod, f"{attr}_orig", None), torch.Tensor):
        return buf, "prune"
    if parametrize.is_parametrized(mod, attr):
        for p in mod.parametrizations[attr]:
            mask = getattr(p, "mask", None)
            if isinstance(mask, torch.Tensor):
                return mask, "parametrize"
    return None, None


@runtime_checkable
class Foldable(Protocol):
    """A module sparsecc folds at compile time: it returns the plain module that computes what it computes
    now, and the masks of that module's weights by attribute name."""

    def sparsecc_fold(self) -> tuple[nn.Module, dict[str, Tensor]]: ...


def _fold_modules(model: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """Replace every module that folds itself (`Foldable`, e.g. SWAT's `sparsecc.swat.TopKLinear`) by the plain module
    it returns; the masks it returns by (module fqn, weight attr)."""
    masks: dict[tuple[str, str], torch.Tensor] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, Foldable):
            continue
        if not name:
            raise MaskError(f"the model itself ({type(mod).__name__}) folds into another module; wrap it in "
                            f"nn.Sequential to compile it")
        with torch.no_grad():
            plain, folded = mod.sparsecc_fold()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, plain.train(mod.training))
        masks.update({(name, a): m for a, m in folded.items()})
    return masks


def _storage(mod: nn.Module, attr: str) -> tuple[nn.Module, str]:
    """The module and attribute holding the tensor behind ``mod.attr``: prune's ``attr_orig``, a
    parametrization's ``original``, else ``attr`` itself."""
    if isinstance(getattr(mod, f"{attr}_orig", None), torch.Tensor):
        return mod, f"{attr}_orig"
    if parametrize.is_parametrized(mod, attr):
        return mod.parametrizations[attr], "original"
    return mod, attr


def _use_name(path: str) -> str:
    """A tensor slot's name as the user would write it: ``head.weight``, not ``head.parametrizations.weight.
    original`` or ``head.weight_orig``."""
    path = re.sub(r"\.parametrizations\.(\w+)\.original\d*$", r".\1", path)
    return path.removesuffix("_orig") if path.endswith("weight_orig") else path


def _untie(model: nn.Module, slots: list[tuple[str, str, Optional[str], LayerKind]]) -> dict[str, tuple[str, ...]]:
    """Give each analysed weight whose tensor has other uses its own copy, so that baking its mask in changes
    no other use. Returns, per such weight fqn, the names of the other uses."""
    uses: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for attr, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None:
                uses.setdefault(id(t), []).append(_use_name(_join(name, attr)))
    shared: dict[str, tuple[str, ...]] = {}
    for module_fqn, attr, _, _ in slots:
        owner, slot = _storage(model.get_submodule(module_fqn), attr)
        tensor = getattr(owner, slot)
        fqn = _join(module_fqn, attr)
        others = tuple(u for u in uses.get(id(tensor), ()) if u != fqn)
        if not others:
            continue
        shared[fqn] = others
        copy_ = tensor.detach().clone()
        if isinstance(tensor, nn.Parameter):
            copy_ = nn.Parameter(copy_, requires_grad=tensor.requires_grad)
        setattr(owner, slot, copy_)
    return shared


def _strip_hooks(model: nn.Module) -> None:
    """Bake every prune hook and parametrization into a plain parameter (weight = orig * mask)."""
    for mod in model.modules():
        for hook in list(mod._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(mod, hook._tensor_name)
        if parametrize.is_parametrized(mod):
            # Removal deletes properties from the module's class, which a deepcopy shares with the user's
            # module: give this copy a class of its own first.
            cls = type(mod)
            own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            mod.__class__ = type(cls.__name__, cls.__bases__, own)
            for attr in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)


class Mask(nn.Module):
    """Parametrization ``weight -> weight * mask`` (what `sparsecc.sparsify` attaches and ``masks=`` becomes on
    the user-model copy); sparsecc reads ``mask``."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _attach(user: nn.Module, explicit: Mapping[str, torch.Tensor], slots: list) -> None:
    """Apply ``masks=`` to the user-model copy the way a user would (prune / parametrize), per use: a tensor
    other modules share keeps its values there."""
    for module_fqn, attr, _, _ in slots:
        fqn = _join(module_fqn, attr)
        if fqn not in explicit:
            continue
        mod = user.get_submodule(module_fqn)
        mask = _as_bool_mask(fqn, explicit[fqn], getattr(mod, attr).shape)
        if parametrize.is_parametrized(mod, attr):
            parametrize.register_parametrization(mod, attr, Mask(mask.to(getattr(mod, attr).device)))
        else:
            prune.custom_from_mask(mod, attr, mask.to(getattr(mod, attr).device))


def _as_bool_mask(fqn: str, mask: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"{fqn}: mask is a {type(mask).__name__}, expected a torch.Tensor of shape "
                        f"{tuple(weight_shape)}")
    if mask.shape != weight_shape:
        raise MaskError(f"{fqn}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight_shape)}; "
                        f"pass a mask of the weight's shape")
    if mask.dtype == torch.bool:
        return mask.detach().cpu()
    mask = mask.detach()
    kept = mask != 0
    if not torch.equal(mask, kept.to(mask.dtype)):     # one compare pass: what other than 0/1 is there?
        bad = kept & (mask != 1)
        example = mask[bad].flatten()[0].item()
        raise MaskError(f"{fqn}: mask holds values other than 0 and 1 (e.g. {example}); pass a boolean mask "
                        f"(mask != 0) or a 0/1 tensor")
    return kept.cpu()


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers: what a stage that replaces modules
    or tensors (narrowing slices, module swapping) needs, without a second copy of every weight. The stage must
    assign new tensors, never write into shared ones."""
    memo: dict[int, object] = {}
    for t in (*model.parameters(), *model.buffers()):
        memo[id(t)] = t
    return copy.deepcopy(model, memo)


def _copy(model: nn.Module) -> nn.Module:
    """deepcopy that also copies the non-leaf tensors prune hooks leave as attributes (``weight = orig *
    mask``), which plain deepcopy refuses."""
    memo: dict[int, object] = {}
    for mod in model.modules():
        for value in vars(mod).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def prepare(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None) -> Prepared:
    """Copy ``model`` into an eval-mode reference with masks applied and return the masks per weight."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsecc needs a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    if was_training:
        warnings.warn("model is in train mode: sparsecc compiles an eval() copy (dropout off, BatchNorm "
                      "running stats); call model.eval() first to silence this", SparseccWarning, stacklevel=3)
    user = _copy(model).eval()
    ref = _copy(model).eval()
    folded = _fold_modules(ref)
    linearized = _linearize(ref)
    slots = weight_slots(ref)
    hooked = {(m, a): (folded[(m, a)], "module") if (m, a) in folded else _hook_mask(ref.get_submodule(m), a)
              for m, a, _, _ in slots}
    shared = _untie(ref, slots)
    _strip_hooks(ref)

    explicit = dict(masks or {})
    for name in linearized:         # masks= speaks of the user's [in, out] weight
        fqn = _join(name, "weight")
        if fqn in explicit:
            explicit[fqn] = _as_bool_mask(fqn, explicit[fqn], user.get_submodule(name).weight.shape).t()
    known = {_join(m, a) for m, a, _, _ in slots}
    unknown = sorted(set(explicit) - known)
    if unknown:
        hint = ", ".join(sorted(known)[:5])
        raise MaskError(f"masks= names {len(unknown)} weight(s) that are not Linear/Conv2d/attention weights of "
                        f"this model: {', '.join(unknown[:5])}; use parameter names such as {hint}")
    _attach(user, dict(masks or {}), slots)

    layers: dict[str, Layer] = {}
    with torch.no_grad():
        for module_fqn, attr, bias_attr, kind in slots:
            mod = ref.get_submodule(module_fqn)
            fqn = _join(module_fqn, attr)
            weight = getattr(mod, attr)
            if fqn in explicit:
                mask, source = _as_bool_mask(fqn, explicit[fqn], weight.shape), "masks="
                weight.mul_(mask.to(weight.device, weight.dtype))
            else:
                hook_mask, hook_source = hooked[(module_fqn, attr)]
                if hook_mask is not None:
                    mask, source = _as_bool_mask(fqn, hook_mask, weight.shape), hook_source
                else:
                    mask, source = (weight != 0).cpu(), "zeros"
            bias = getattr(mod, bias_attr, None) if bias_attr else None
            for tensor, what in ((weight, "weight"), (bias, "bias")):
                if tensor is not None and not reductions.all_finite(tensor):
                    count = int((~torch.isfinite(tensor)).sum())
                    raise WeightError(f"{module_fqn or '<root>'}: {what} holds {count} NaN/Inf value(s); "
                                      f"fix the checkpoint (or the training run) before compiling")
            layers[fqn] = Layer(fqn, module_fqn, _join(module_fqn, bias_attr) if bias is not None else None,
                                kind, mask, source, shared.get(fqn, ()))
    log.debug("prepared %d layers (%d sharing their tensor)", len(layers), len(shared))
    return Prepared(ref, layers, was_training, user, linearized)
