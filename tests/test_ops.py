"""The op contract: fake kernels agree with the real ones (so torch.export / torch.compile / ONNX can trace
the ops), and the pass manager names the pass that breaks a graph."""

import pytest
import torch
from torch import fx, nn

from sparsecc import PassError
from sparsecc.core import formats
from sparsecc.passes.manager import PassManager, PassResult
from sparsecc.tooling.synthetic import fanin_mask, nm_mask


def _fanin_args():
    w = torch.randn(12, 20)
    mask = fanin_mask(w, 0.75, ablate=0.25)
    enc = formats.encode_fanin(w * mask, mask, int(mask.sum(1).max()))
    return (torch.randn(3, 20), enc.values, enc.indices, enc.rows, torch.randn(12), 12, "reference")


def _conv_args():
    w = torch.randn(8, 3, 3, 3)
    mask = fanin_mask(w, 0.5, ablate=0.25).reshape(8, -1)
    enc = formats.encode_fanin(w.reshape(8, -1) * mask, mask, int(mask.sum(1).max()))
    return (torch.randn(2, 6, 7, 7), enc.values, enc.indices, enc.rows, None, 8, [3, 3], [2, 2], [1, 1], [1, 1], 2,
            "reference")


def _conv_channels_last_args():
    """A channels-last input: the op answers channels-last, and its fake must say so (inductor checks an op's
    output strides against its fake's)."""
    x, *rest = _conv_args()
    return (x.contiguous(memory_format=torch.channels_last), *rest)


def _nm_args():
    w = torch.randn(10, 16)
    mask = nm_mask(w)
    values, meta = formats.encode_nm(w * mask, mask)
    return (torch.randn(4, 16), values, meta, torch.randn(10), 16, "reference")


@pytest.mark.parametrize("op,args", [("condensed_linear", _fanin_args), ("condensed_conv2d", _conv_args),
                                     ("condensed_conv2d", _conv_channels_last_args), ("nm_linear", _nm_args)])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.sparsecc, op).default, args(),
                          test_utils=("test_schema", "test_faketensor"))


def test_a_channels_last_convolution_answers_in_the_strides_its_fake_gives():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _conv_channels_last_args()
    real = torch.ops.sparsecc.condensed_conv2d(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.sparsecc.condensed_conv2d(mode.from_tensor(args[0]), *args[1:])
    assert real.is_contiguous(memory_format=torch.channels_last) and not real.is_contiguous()
    assert (real.shape, real.stride()) == (fake.shape, fake.stride())


def test_export_traces_a_condensed_op():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.args = _fanin_args()

        def forward(self, x):
            return torch.ops.sparsecc.condensed_linear(x, *self.args[1:])

    ep = torch.export.export(M(), (torch.randn(3, 20),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.sparsecc.condensed_linear.default in targets


class _Breaks:
    name = "breaks_graph"
    after = ()
    counts = {}

    def requires(self, gm):
        pass

    def call(self, gm):
        stranger = fx.Graph().placeholder("x")     # a node of another graph: lint must reject its use
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            gm.graph.call_function(torch.relu, (stranger,))
        return PassResult(gm, True)

    def ensures(self, gm):
        pass


def test_pass_manager_names_the_failing_pass():
    gm = fx.symbolic_trace(nn.Linear(2, 2))
    with pytest.raises(PassError, match="pass breaks_graph failed"):
        PassManager([_Breaks()]).run(gm)


class _Named:
    def __init__(self, name, after=()):
        self.name, self.after = name, after

    def requires(self, gm):
        pass

    def call(self, gm):
        return PassResult(gm, False)

    def ensures(self, gm):
        pass


def test_pass_manager_refuses_passes_out_of_order_before_running_any():
    with pytest.raises(PassError, match=r"pass b must run after a.*order: b, a"):
        PassManager([_Named("b", after=("a",)), _Named("a")])
    gm = fx.symbolic_trace(nn.Linear(2, 2))
    first = PassManager([_Named("a"), _Named("b", after=("a",))])
    first.run(gm)
    assert first.names() == ("a", "b")
    later = PassManager([_Named("c", after=("a", "b"))], ran=first.names())
    later.run(gm)
    assert later.names() == ("a", "b", "c")
    with pytest.raises(PassError, match="pass c must run after b"):
        PassManager([_Named("c", after=("b",))], ran=("a",))


def test_the_built_in_passes_declare_their_order():
    from sparsecc.passes.fold import FoldBatchNorm
    from sparsecc.passes.rewrite import CondenseFunctionalOps, CondenseModules, DropUnusedWeights

    assert CondenseModules.after == ()
    assert CondenseFunctionalOps.after == ("condense_modules",)
    assert set(DropUnusedWeights.after) == {"condense_modules", "condense_functional_ops"}
    assert FoldBatchNorm.after == ("condense_modules",)
