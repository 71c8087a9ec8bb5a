"""Seeded random valid models with masks of every structure from every source.

A case is fully determined by its seed: `case(seed)` rebuilds the same model, masks and inputs, so a failure
is reproduced by its seed alone."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

from sparsecc import swat

STRUCTURES = ("fanin", "fanin_ablated", "all_ablated", "2:4", "channels", "unstructured", "zero", "dense",
              "near_miss")
SOURCES = ("masks=", "prune", "parametrize", "zeros", "swat")
#: The model's dtype, drawn per case (float32 most often): the op runtimes run it in that dtype.
DTYPES = (torch.float32,) * 4 + (torch.bfloat16, torch.float16)


@dataclass
class Case:
    seed: int
    family: str
    model: nn.Module
    inputs: tuple
    masks: Optional[dict[str, Tensor]]        # for `masks=`; None when masks live in the model
    structures: dict[str, str] = field(default_factory=dict)
    source: str = ""
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        layers = ", ".join(f"{k}:{v}" for k, v in self.structures.items())
        dtype = "" if self.dtype == torch.float32 else f" in {str(self.dtype).removeprefix('torch.')}"
        return f"seed {self.seed}: {self.family}{dtype}, masks from {self.source} [{layers}]"

    def in_dtype(self) -> "Case":
        """This case with its model (converted in place: a case is rebuilt from its seed for each use) and float
        inputs in the drawn dtype."""
        if self.dtype == torch.float32:
            return self
        cast = lambda t: t.to(self.dtype) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
        return Case(self.seed, self.family, self.model.to(self.dtype),
                    tuple(cast(t) for t in self.inputs), self.masks, self.structures, self.source, self.dtype)

    def user_model(self) -> nn.Module:
        """The model as the user runs it: with `masks=` applied (as prune masks on a copy, built here rather
        than by sparsecc), which the user means by passing them."""
        if self.masks is None:
            return self.model
        model = copy.deepcopy(self.model)
        for fqn, mask in self.masks.items():
            owner, _, attr = fqn.rpartition(".")
            prune.custom_from_mask(model.get_submodule(owner), attr, mask)
        return model

    def fresh_inputs(self, batch: Optional[int] = None) -> tuple:
        gen = torch.Generator().manual_seed(self.seed + 1)
        return tuple(_like(t, gen, batch) for t in self.inputs)


def _like(t: Any, gen: torch.Generator, batch: Optional[int]) -> Any:
    if not isinstance(t, Tensor):
        return t
    shape = (batch if batch is not None else t.shape[0], *t.shape[1:])
    if t.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=t.dtype)
    return torch.randint(0, int(t.max()) + 1, shape, generator=gen, dtype=t.dtype)


def mask_of(rng: random.Random, weight: Tensor, structure: str) -> Tensor:
    """A boolean mask of ``structure`` for ``weight`` (fan-in over the flattened C/groups*R*S; 2:4 along dim 1)."""
    out = weight.shape[0]
    w2 = weight.reshape(out, -1)
    fan = w2.shape[1]
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    if structure == "dense":
        return torch.ones_like(weight, dtype=torch.bool)
    if structure == "zero":
        return torch.zeros_like(weight, dtype=torch.bool)
    if structure == "unstructured":
        return torch.rand(weight.shape, generator=gen) < rng.uniform(0.2, 0.6)
    if structure == "2:4" and weight.dim() == 2:
        m = torch.zeros(out, fan // 4 * 4, dtype=torch.bool)
        keep = torch.rand(out, fan // 4, 4, generator=gen).argsort(-1)[..., :2]
        m.view(out, -1, 4).scatter_(2, keep, True)
        return torch.cat([m, torch.ones(out, fan - m.shape[1], dtype=torch.bool)], 1).reshape(weight.shape)
    if structure == "channels" and weight.dim() == 4:
        keep = torch.rand(weight.shape[1], generator=gen) < 0.5
        keep[0] = True
        return keep.view(1, -1, 1, 1).expand_as(weight).clone()
    k = max(1, round(fan * rng.uniform(0.05, 0.6)))
    m = torch.zeros(out, fan, dtype=torch.bool)
    m.scatter_(1, torch.rand(out, fan, generator=gen).argsort(1)[:, :k], True)
    if structure in ("fanin_ablated", "channels", "2:4"):      # 2:4/channels on a shape they do not fit
        m[torch.rand(out, generator=gen) < 0.3] = False
    elif structure == "all_ablated":
        m[:] = False
        m[0, :k] = out == 1
    elif structure == "near_miss" and k < fan:
        row = rng.randrange(out)
        m[row, (~m[row]).nonzero()[0]] = True
    return m.reshape(weight.shape)


# -- model families ----------------------------------------------------------------------------------------

def _act(rng: random.Random) -> nn.Module:
    return rng.choice([nn.ReLU(), nn.ReLU(inplace=True), nn.GELU(), nn.Tanh(), nn.Identity()])


def _dim(rng: random.Random) -> int:
    return rng.choice([4, 6, 8, 12, 16, 24, 32, 40, 64, 96])


def mlp(rng: random.Random) -> tuple[nn.Module, tuple]:
    dims = [_dim(rng) for _ in range(rng.randint(2, 4))]
    layers: list[nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b, bias=rng.random() < 0.8), _act(rng)]
    tokens = rng.choice([(), (1,), (3,), (17,), (rng.randint(1, 200),)])
    return nn.Sequential(*layers), (torch.randn(rng.randint(1, 5), *tokens, dims[0]),)


def _conv(rng: random.Random, c_in: int, c_out: int) -> nn.Conv2d:
    k = rng.choice([1, 3, 3, 5, 7])
    stride = rng.choice([1, 1, 2])
    dilation = rng.choice([1, 1, 2]) if k > 1 else 1
    padding: Any = rng.choice(["same", k // 2 * dilation, 0, 1]) if stride == 1 else rng.choice([0, 1, k // 2])
    groups = rng.choice([g for g in (1, 2, c_in) if c_in % g == 0 and c_out % g == 0])
    mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
    if mode != "zeros" and padding not in ("same", 0) and padding >= 4:
        mode = "zeros"
    return nn.Conv2d(c_in, c_out, k, stride, padding, dilation, groups, bias=rng.random() < 0.7, padding_mode=mode)


class Residual(nn.Module):
    def __init__(self, rng: random.Random, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn_b(self.b(F.relu(self.bn_a(self.a(x))))))


def cnn(rng: random.Random) -> tuple[nn.Module, tuple]:
    c = c_in = rng.choice([3, 4, 8])
    size = rng.choice([8, 11, 16])
    layers: list[nn.Module] = []
    side = size
    for _ in range(rng.randint(1, 3)):
        c_out = rng.choice([4, 8, 16])
        conv = _conv(rng, c, c_out)
        layers.append(conv)
        if rng.random() < 0.5:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(_act(rng))
        c = c_out
        if conv.padding != "same":
            side = (side + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    if side >= 4 and rng.random() < 0.4:        # a max pool: run in its measured layout, narrowed through
        k = rng.choice([2, 3])
        layers.append(nn.MaxPool2d(k, 2, padding=rng.choice([0, k // 2]), ceil_mode=rng.random() < 0.3))
    if rng.random() < 0.4:
        layers.append(Residual(rng, c))
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c, rng.choice([5, 8, 10]))]
    return nn.Sequential(*layers), (torch.randn(rng.randint(1, 4), c_in, size, size),)


class HandAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3) for p in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        return self.o((att @ v).permute(0, 2, 1, 3).reshape(b, t, d))


class MHABlock(nn.Module):
    def __init__(self, d: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.ff = nn.Linear(d, d)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        x = x if self.batch_first else x.transpose(0, 1)
        y = self.attn(x, x, x, need_weights=False)[0]
        y = y if self.batch_first else y.transpose(0, 1)
        return self.ff(y)


def attention(rng: random.Random) -> tuple[nn.Module, tuple]:
    d, heads = rng.choice([(16, 2), (32, 4), (24, 2)])
    kind = rng.choice(["mha", "encoder", "hand"])
    if kind == "mha":
        model: nn.Module = MHABlock(d, heads, rng.random() < 0.5)
    elif kind == "encoder":
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, batch_first=True, norm_first=rng.random() < 0.3,
                                           activation=rng.choice(["relu", "gelu"]))
        model = nn.TransformerEncoder(layer, rng.randint(1, 2), enable_nested_tensor=False)
    else:
        model = HandAttention(d, heads)
    return model, (torch.randn(rng.randint(1, 3), rng.choice([1, 5, 17, 64]), d),)


class TiedLM(nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.relu(self.mid(self.emb(ids))))


class Twice(nn.Module):
    """A module called twice, a view/permute between, and several outputs (tuple or dict)."""

    def __init__(self, d: int, as_dict: bool) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, 2 * d)
        self.as_dict = as_dict

    def forward(self, x: Tensor) -> Any:
        h = self.a(torch.relu(self.a(x)))
        y = self.b(h).view(*h.shape[:-1], 2, -1).transpose(-1, -2).flatten(-2)
        return {"y": y, "h": h} if self.as_dict else (y, h)


def shared(rng: random.Random) -> tuple[nn.Module, tuple]:
    if rng.random() < 0.5:
        vocab, d = rng.choice([(40, 16), (100, 32)])
        return TiedLM(vocab, d), (torch.randint(0, vocab, (rng.randint(1, 4), rng.randint(1, 20))),)
    d = rng.choice([8, 16, 32])
    return Twice(d, rng.random() < 0.5), (torch.randn(rng.randint(1, 5), d),)


FAMILIES: dict[str, Callable[[random.Random], tuple[nn.Module, tuple]]] = {
    "mlp": mlp, "cnn": cnn, "attention": attention, "shared": shared,
}


def _weights(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            out.append((name, mod, "weight"))
        elif isinstance(mod, nn.MultiheadAttention):
            out.append((name, mod, "in_proj_weight"))
    return out


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)


def case(seed: int, family: Optional[str] = None) -> Case:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    family = family or rng.choice(list(FAMILIES))
    while True:      # only valid models: redraw (from the same seeded stream) until the dense model runs
        model, inputs = FAMILIES[family](rng)
        try:
            with torch.no_grad():
                model.eval()(*inputs)
            break
        except RuntimeError:
            continue
    with torch.no_grad():
        _randomise_bn(model, torch.Generator().manual_seed(seed))
    source = rng.choice(SOURCES)
    dtype = random.Random(f"{seed}/dtype").choice(DTYPES)    # its own stream: the models stay as they were
    if source == "swat":       # SWAT top-K modules: the masks are what the modules compute
        structured = rng.random() < 0.5
        density = rng.choice([0.1, 0.25, 0.5])
        model = swat.swatify(model, density, structured).eval()
        return Case(seed, family, model, inputs, None, {"*": f"swat top-K {density}{' channels' * structured}"},
                    source, dtype)
    masks: dict[str, Tensor] = {}
    structures: dict[str, str] = {}
    seen: set[int] = set()
    for name, mod, attr in _weights(model):
        weight = getattr(mod, attr)
        if id(weight) in seen or rng.random() < 0.15:
            continue
        seen.add(id(weight))
        structure = rng.choice(STRUCTURES)
        fqn = f"{name}.{attr}" if name else attr
        structures[fqn] = structure
        mask = mask_of(rng, weight, structure)
        if source == "masks=":
            masks[fqn] = mask
        elif source == "prune":
            prune.custom_from_mask(mod, attr, mask)
        elif source == "parametrize":
            parametrize.register_parametrization(mod, attr, FakeSparsity(mask))
        else:
            with torch.no_grad():
                weight.mul_(mask)
    return Case(seed, family, model, inputs, masks if source == "masks=" else None, structures, source, dtype)
