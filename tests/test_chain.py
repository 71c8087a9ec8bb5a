"""Chained Linear pairs (`sparsecc.passes.chain`, `sparsecc.core.chain`): fc1 -> elementwise -> fc2 runs as one
call keeping the intermediate tokens-last on the TVM runtime. Which pairs chain, that the chained call is what
runs and equals the layers called one by one (bit for bit: the same kernels, the activation on the same
values), that hooks (validation's) see each layer's own input and output, and that every call it cannot chain
falls back to the layers themselves, equal to the user's model."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import sparsecc
from sparsecc.core.chain import chained, module_activation
from sparsecc.core.layers import CondensedLayer
from sparsecc.runtimes import unavailable
from sparsecc.tooling.synthetic import attach_with_prune, fanin_mask
from tests.conftest import assert_equivalent

pytestmark = pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}")


class Block(nn.Module):
    """A transformer MLP block: LayerNorm, fc1, an activation, eval Dropout, fc2, residual."""

    def __init__(self, act: nn.Module = None, width: int = 48, hidden: int = 160) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = act if act is not None else nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class Functional(Block):
    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SharedIntermediate(Block):
    def forward(self, x):        # fc1's output has a second user: no chain
        h = self.fc1(x)
        return self.fc2(self.act(h)), h


class NotElementwise(Block):
    def forward(self, x):        # a LayerNorm between: no chain
        return self.fc2(F.layer_norm(self.fc1(x), (self.fc1.out_features,)))


def _masks(model, sparsity=0.85):
    """Fan-in masks on fc1 and fc2, attached with torch's pruning hooks: the user's model runs masked, and
    compiles from its hooks (the masks are returned for the masked reference)."""
    masks = {f"{name}.weight": fanin_mask(getattr(model, name).weight, sparsity) for name in ("fc1", "fc2")}
    attach_with_prune(model, masks)
    return masks


def _block(**options):
    """The masked `Block` and its compiled form (sparse kernels everywhere), checked to hold a chain."""
    torch.manual_seed(0)
    model = Block().eval()
    _masks(model)
    compiled = sparsecc.compile(model, (torch.randn(1, 40, 48),), autotune=False, **options)
    assert _chain_calls(compiled)
    return model, compiled


def _chain_calls(compiled) -> list[fx.Node]:
    return [n for n in compiled.module.graph.nodes if n.op == "call_function" and n.target is chained]


def _act_names(compiled, call: fx.Node) -> tuple:
    return tuple(module_activation(compiled.module.get_submodule(a.target)) if isinstance(a, fx.Node) else a
                 for a in call.args[3])


def _check(compiled, model, x):
    with torch.no_grad():
        actual, expected = compiled(x), model(x)
        reference = sparsecc.masked_reference(model)(x)
    for a, e in ((actual, expected), (actual, reference)):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.fixture
def spy(monkeypatch):
    """How many calls the runtime chained (returned a result for)."""
    from sparsecc.runtimes.tvm import runtime

    ran = []
    inner = runtime.BoundLinear.chain

    def chain(self, *args, **kwargs):
        result = inner(self, *args, **kwargs)
        ran.append(result is not None)
        return result

    monkeypatch.setattr(runtime.BoundLinear, "chain", chain)
    return ran


@pytest.mark.parametrize("act,names", [(nn.GELU(), ("gelu", "identity")), (nn.ReLU(), ("relu", "identity")),
                                       (nn.SiLU(), ("silu", "identity")), (nn.GELU("tanh"), ("gelu_tanh", "identity"))])
def test_mlp_block_chains_and_runs_chained(act, names, spy):
    torch.manual_seed(0)
    model = Block(act).eval()
    _masks(model)
    compiled = sparsecc.compile(model, (torch.randn(1, 40, 48),), autotune=False)
    (call,) = _chain_calls(compiled)
    assert _act_names(compiled, call) == names and [a.target for a in call.args[1:3]] == ["fc1", "fc2"]
    assert any("1 Linear pair(s) chained" in n and "fc1 -> fc2" in n for n in compiled.report.notes)
    # the layers stay at their paths: the same state dict as the model compiled where nothing chains
    apart = sparsecc.compile(model, (torch.randn(1, 40, 48),), backend="reference")
    assert compiled.state_dict().keys() == apart.state_dict().keys()
    spy.clear()
    _check(compiled, model, torch.randn(1, 40, 48))
    assert spy == [True]                         # the bucket compile measured
    _check(compiled, model, torch.randn(3, 40, 48))
    _check(compiled, model, torch.randn(3, 40, 48))
    assert spy == [True, False, True]            # a new bucket: its first call runs the layers and measures them


def test_chained_call_equals_the_layers_called_one_by_one():
    """Same kernels and the activation on the same values: equal bit for bit, and to the dense ops."""
    torch.manual_seed(0)
    model = Block().eval()
    _masks(model, 0.9)
    compiled = sparsecc.compile(model, (torch.randn(1, 70, 48),), autotune=False, narrow=False)
    fc1, fc2 = compiled.module.fc1, compiled.module.fc2
    x = torch.randn(1, 70, 48)
    with torch.no_grad():
        alone = fc2(F.gelu(fc1(x)))
        together = chained(x, fc1, fc2, ("gelu", compiled.module.drop))
        dense = F.linear(F.gelu(F.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        user = model.fc2(F.gelu(model.fc1(x)))
    assert together.shape == alone.shape == (1, 70, 48) and together.dtype == alone.dtype
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    strided = torch.randn(48, 70).t().unsqueeze(0)          # non-contiguous: copied as a layer would
    with torch.no_grad():
        torch.testing.assert_close(chained(strided, fc1, fc2, ("gelu", compiled.module.drop)),
                                   fc2(F.gelu(fc1(strided))), rtol=0, atol=0)
    assert_equivalent(together, dense)
    assert_equivalent(together, user)


def test_hooks_see_each_layers_own_input_and_output(spy):
    """Validation's hooks on a chained pair: fc1's output before the activation, fc2's input after it, each
    equal to its dense op; a hook that replaces fc1's output changes the result as torch's hooks do."""
    _, compiled = _block(narrow=False)
    fc1, fc2 = compiled.module.fc1, compiled.module.fc2
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0].clone(), o.clone())))
               for n, m in (("fc1", fc1), ("fc2", fc2))]
    x = torch.randn(1, 40, 48)
    spy.clear()
    with torch.no_grad():
        y = compiled(x)
        x1, y1 = seen["fc1"]
        x2, y2 = seen["fc2"]
        assert x1.shape == (1, 40, 48) and y1.shape == x2.shape == (1, 40, 160) and y2.shape == (1, 40, 48)
        assert_equivalent(y1, F.linear(x1, fc1.weight, fc1.bias))
        torch.testing.assert_close(x2, F.gelu(y1), rtol=0, atol=0)
        assert_equivalent(y2, F.linear(x2, fc2.weight, fc2.bias))
        torch.testing.assert_close(y, x + y2, rtol=0, atol=0)
        for h in handles:
            h.remove()
        fc1.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
        replaced = compiled(x)
        expected = x + F.linear(torch.zeros(1, 40, 160), fc2.weight, fc2.bias)
    assert spy == [True, True]
    assert replaced.shape == expected.shape and replaced.dtype == expected.dtype
    assert_equivalent(replaced, expected)


def test_functional_activation_chains():
    torch.manual_seed(0)
    model = Functional().eval()
    _masks(model)
    compiled = sparsecc.compile(model, (torch.randn(1, 40, 48),), autotune=False)
    (call,) = _chain_calls(compiled)
    assert _act_names(compiled, call) == ("gelu_tanh",)
    _check(compiled, model, torch.randn(2, 40, 48))


@pytest.mark.parametrize("cls", [SharedIntermediate, NotElementwise])
def test_what_is_not_elementwise_or_has_other_users_stays_apart(cls):
    torch.manual_seed(0)
    model = cls().eval()
    _masks(model)
    compiled = sparsecc.compile(model, (torch.randn(1, 40, 48),), autotune=False)
    assert not _chain_calls(compiled)
    assert sum(isinstance(m, CondensedLayer) for m in compiled.modules()) == 2
    x = torch.randn(2, 40, 48)
    with torch.no_grad():
        actual, expected = compiled(x), model(x)
    for a, e in zip(actual if isinstance(actual, tuple) else (actual,), expected if isinstance(expected, tuple)
                    else (expected,)):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_a_runtime_that_does_not_chain_keeps_the_pair_apart():
    torch.manual_seed(0)
    model = Block().eval()
    _masks(model)
    compiled = sparsecc.compile(model, (torch.randn(1, 40, 48),), backend="reference")
    assert not _chain_calls(compiled)
    _check(compiled, model, torch.randn(2, 40, 48))


@pytest.mark.parametrize("tokens", [1, 2])
def test_calls_the_runtime_does_not_chain_run_the_layers(tokens, spy):
    """Few tokens (the one-token kernels), a bucket measured dense, a gradient: the layers one by one."""
    torch.manual_seed(0)
    model = Block().eval()
    _masks(model)
    compiled = sparsecc.compile(model, (torch.randn(1, tokens, 48),), autotune=False)
    assert _chain_calls(compiled)
    spy.clear()
    _check(compiled, model, torch.randn(3, tokens, 48))
    assert not any(spy)
    x = torch.randn(1, tokens, 48, requires_grad=True)
    compiled(x).sum().backward()      # the op path carries the backward
    assert x.grad is not None and x.grad.shape == x.shape


def test_a_dense_choice_runs_the_pair_apart(spy):
    torch.manual_seed(0)
    model = Block(width=32, hidden=64).eval()
    _masks(model, 0.5)
    compiled = sparsecc.compile(model, (torch.randn(1, 40, 32),))
    chosen = {name: compiled.module.get_submodule(name).choices() for name in ("fc1", "fc2")}
    spy.clear()
    _check(compiled, model, torch.randn(1, 40, 32))
    sparse = all(not c.dense for choices in chosen.values() for c in choices.values())
    assert spy and all(spy) == sparse, (chosen, spy)


def test_bf16_precision_runs_the_pair_apart(spy):
    torch.manual_seed(0)
    model = Block().eval()
    _masks(model)
    compiled = sparsecc.compile(model, (torch.randn(1, 40, 48),), precision="bf16", autotune=False)
    spy.clear()
    x = torch.randn(2, 40, 48)
    with torch.no_grad():
        actual, expected = compiled(x), model(x)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=5e-2, atol=5e-2)
    assert not any(spy)


def test_chained_model_exports_and_saves(tmp_path):
    model, compiled = _block()
    x = torch.randn(1, 40, 48)
    path = sparsecc.save(compiled, tmp_path / "m.pt2")
    loaded = sparsecc.load(path)
    with torch.no_grad():
        actual, expected = loaded(x), model(x)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_a_dropout_back_in_training_mode_runs_the_pair_apart(spy):
    """The chain holds the modules between its layers: one put in training mode is run as itself, as the
    user's model runs its own (p = 1: everything fc1 gave is dropped)."""
    model, compiled = _block(narrow=False)
    for drop in (compiled.module.drop, model.drop):
        drop.p = 1.0
        drop.train()
    spy.clear()
    x = torch.randn(1, 40, 48)
    with torch.no_grad():
        y, expected = compiled(x), model(x)
    assert not spy
    assert y.shape == expected.shape and y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
