"""`sparsecc.export_tvm` / `load_tvm`: whole models as TVM libraries whose outputs equal the masked torch
reference, every kernel path of the converters, a fresh process that cannot import torch, and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sparsecc
from sparsecc import ExportError, InputError, VersionError
from sparsecc.runtimes import unavailable
from sparsecc.runtimes.tvm import library as tvm_library, runner as tvm_runner
from sparsecc.tooling import synthetic
from sparsecc.tooling.demo import build
from tests.conftest import assert_equivalent
from tests.unexportable import Unexportable

pytestmark = pytest.mark.skipif(unavailable("tvm") is not None, reason=f"TVM not installed: {unavailable('tvm')}")


def _check(model: nn.Module, masks: dict, x: torch.Tensor, path: Path) -> tvm_library.TvmExport:
    exported = sparsecc.export_tvm(model, x, path, masks=masks)
    y = torch.from_numpy(sparsecc.load_tvm(exported.path)(x.numpy()))
    with torch.no_grad():
        assert_equivalent(y, sparsecc.masked_reference(model, masks)(x))
    return exported


class _Mlp(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(48, 64, bias=bias)
        self.b = nn.Linear(64, 64, bias=bias)
        self.c = nn.Linear(64, 16)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.nn.functional.gelu(self.a(x)))))


@pytest.mark.parametrize("shape,kernel,calls", [((1, 48), "gemv", 2), ((2, 48), "gemv", 4),   # one per token
                                                ((2, 5, 48), "spmm_kb", 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_fanin_linears_with_ablated_rows_and_an_empty_layer(tmp_path, shape, kernel, calls, bias):
    model = _Mlp(bias).eval()
    masks = {"a.weight": synthetic.fanin_mask(model.a.weight, 0.8, 0.25),   # k = 9: not a multiple of 8
             "b.weight": torch.zeros_like(model.b.weight, dtype=torch.bool),   # every row ablated: a constant
             "c.weight": synthetic.fanin_mask(model.c.weight, 0.9)}
    exported = _check(model, masks, torch.randn(*shape), tmp_path / "mlp.so")
    # the token kernel reads its input transposed and writes its output transposed: two transposes per call
    transposes = {"condensed_linear/transpose": 2 * calls} if kernel != "gemv" else {}
    assert exported.kernels == {f"condensed_linear/{kernel}": calls, **transposes}
    assert exported.output_shapes == [(*shape[:-1], 16)]


@pytest.mark.parametrize("in_f,tokens,kernels", [
    (64, 1, {"nm_linear/nm_gemv_avx": 1, "addmm/gemv": 1}),
    (64, 4, {"nm_linear/spmm_kb": 1, "nm_linear/transpose": 2, "addmm/spmm_kb": 1, "addmm/transpose": 2}),
    (40, 1, {"nm_linear/gemv": 1, "addmm/gemv": 1})])   # 40 % 16: as fan-in on kept positions
def test_two_four_linears(tmp_path, in_f, tokens, kernels):
    # the second Linear is dense: the fan-in kernels with every input (TVM's own matmul was a naive loop)
    model = nn.Sequential(nn.Linear(in_f, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    masks = {"0.weight": synthetic.nm_mask(model[0].weight)}
    exported = _check(model, masks, torch.randn(tokens, in_f), tmp_path / "nm.so")
    assert exported.kernels == kernels


@pytest.mark.parametrize("conv,hw,kernel", [
    (dict(kernel_size=3, padding=1), 9, "spmm_flat"),                     # stride 1: taps read the padded input
    (dict(kernel_size=3, padding=2, dilation=2), 8, "spmm_flat"),
    (dict(kernel_size=3, stride=2, padding=1), 9, "spmm_flat"),           # strided: taps read phase planes
    (dict(kernel_size=(1, 3), stride=(2, 1), padding=(0, 1)), 7, "spmm_flat"),
    (dict(kernel_size=7, stride=2, padding=3), 11, "spmm_flat"),          # a stem
    (dict(kernel_size=3, stride=(2, 3), padding=(1, 0), dilation=2), 12, "spmm_flat"),
    (dict(kernel_size=3, stride=4, padding=1), 13, "spmm"),               # 16 phase planes: im2col taps
    (dict(kernel_size=1, stride=2), 9, "spmm"),                           # pointwise reads the input itself
    (dict(kernel_size=2, stride=2), 9, "spmm"),                           # patches: im2col is a transpose
    (dict(kernel_size=3, padding=1, groups=2), 6, "spmm"),
])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv2d_paths(tmp_path, conv, hw, kernel, batch):
    model = nn.Sequential(nn.Conv2d(8, 12, **conv), nn.BatchNorm2d(12), nn.ReLU()).eval()
    nn.init.normal_(model[1].running_mean)
    masks = {"0.weight": synthetic.fanin_mask(model[0].weight, 0.7, 0.25)}
    exported = _check(model, masks, torch.randn(batch, 8, hw, hw), tmp_path / "conv.so")
    assert exported.kernels == {f"condensed_conv2d/{kernel}": batch}


class _DenseOps(nn.Module):
    """Dense ops the export runs on the token kernel (grouped conv, bmm) next to one it leaves to TVM."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = self.conv(x).flatten(2)                          # [n, 8, 16]
        y = torch.bmm(y, self.fc(y).transpose(1, 2))         # [n, 8, 8]
        return self.up(y.view(-1, 8, 2, 4).repeat(1, 4, 1, 1)[:, :8])


@pytest.mark.slow
def test_dense_ops_on_the_token_kernel(tmp_path):
    model = _DenseOps().eval()
    masks = {"fc.weight": synthetic.fanin_mask(model.fc.weight, 0.75)}
    exported = _check(model, masks, torch.randn(2, 4, 4, 4), tmp_path / "dense.so")
    # the grouped conv unfolds per sample; the transposed conv is TVM's own
    assert exported.kernels == {"convolution/spmm": 2, "bmm/spmm": 2, "condensed_linear/spmm_kb": 1,
                                "condensed_linear/transpose": 2}


class _Matmuls(nn.Module):
    """Dense matmuls of every form the export meets: nn.Linear without bias (``mm`` of a transposed constant), a
    constant ``[in, out]`` matrix, ``addmm`` with a scaled bias (left to TVM), and a product of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 24, bias=False)
        self.proj = nn.Parameter(torch.randn(24, 16))
        self.bias = nn.Parameter(torch.randn(16))
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        y = self.fc(x) @ self.proj                               # [tokens, 16]
        y = torch.addmm(self.bias, y, self.w, beta=0.5)
        return y @ y.t()


@pytest.mark.parametrize("tokens,kernel", [(1, "gemv"), (12, "spmm_kb")])
def test_dense_matmuls(tmp_path, tokens, kernel):
    model = _Matmuls().eval()
    exported = _check(model, {}, torch.randn(tokens, 16), tmp_path / "mm.so")
    transposes = {"mm/transpose": 4} if kernel != "gemv" else {}
    assert exported.kernels == {f"mm/{kernel}": 2, **transposes}


_NO_TORCH = """
import importlib.util, sys
sys.modules["torch"] = None          # importing torch (or sparsecc, which needs it) now fails
spec = importlib.util.spec_from_file_location("tvm_runner", sys.argv[1])
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
import numpy as np
model = runner.load(sys.argv[2])
np.save(sys.argv[4], model(np.load(sys.argv[3])))
assert "torch" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
"""


def _run_without_torch(path: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    np.save(tmp_path / "x.npy", x.numpy())
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, tvm_runner.__file__, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.from_numpy(np.load(tmp_path / "y.npy"))


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_resnet18(tmp_path, structure):
    model = build("resnet18")
    masks = synthetic.structured_masks(model, structure, 0.9, 0.1, synthetic.all_but_stem)
    x = torch.randn(1, 3, 64, 64)
    exported = _check(model, masks, x, tmp_path / "r18.so")
    assert sum(n for k, n in exported.kernels.items() if k.startswith("condensed_conv2d/")) == 19
    assert exported.kernels["convolution/spmm_flat"] == 1    # the dense stem (7x7/2: on phase planes)
    # a fresh process that cannot import torch loads and runs the same library
    with torch.no_grad():
        assert_equivalent(_run_without_torch(exported.path, x, tmp_path), sparsecc.masked_reference(model, masks)(x))


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["fanin", "2:4"])
def test_vit_b_16(tmp_path, structure):
    # 64x64 images: 17 tokens, the same layers and kernels as at 224x224 (197 tokens), which `sparsecc bench`
    # exports, validates and times
    model = build("vit_b_16", image_size=64)
    masks = synthetic.structured_masks(model, structure, 0.9, 0.05, synthetic.vit_encoder)
    exported = _check(model, masks, torch.randn(1, 3, 64, 64), tmp_path / "vit.so")
    sparse = "nm_linear" if structure == "2:4" else "condensed_linear"
    # the token kernel for every encoder Linear, with its two transposes; attention's two bmm per layer, 12
    # heads each; the dense patch embedding and classifier head
    assert exported.kernels == {f"{sparse}/spmm_kb": 48, f"{sparse}/transpose": 96, "bmm/spmm": 2 * 12 * 12,
                                "convolution/spmm": 1, "addmm/gemv": 1}


@pytest.mark.slow
def test_runner_script_prints_metadata(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    exported = sparsecc.export_tvm(model, torch.randn(1, 16), tmp_path / "m.so",
                                   masks={"0.weight": synthetic.fanin_mask(model[0].weight, 0.5)})
    done = subprocess.run([sys.executable, tvm_runner.__file__, str(exported.path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"format": 1' in done.stdout and "output (1, 8) float32 finite" in done.stdout


# -- bad input ----------------------------------------------------------------------------------------------------

def _small(tmp_path: Path) -> tuple[nn.Module, dict]:
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    return model, {"0.weight": synthetic.fanin_mask(model[0].weight, 0.5)}


def test_wrong_input_shape_is_a_clear_error(tmp_path):
    model, masks = _small(tmp_path)
    loaded = sparsecc.load_tvm(sparsecc.export_tvm(model, torch.randn(1, 16), tmp_path / "m.so", masks=masks).path)
    with pytest.raises(InputError, match=r"exported for \[1, 16\]"):
        loaded(np.zeros((2, 16), np.float32))
    with pytest.raises(InputError, match="takes 1 input"):
        loaded()


def test_library_from_another_format_is_refused(tmp_path, monkeypatch):
    model, masks = _small(tmp_path)
    monkeypatch.setattr(tvm_library, "FORMAT", 999)
    path = sparsecc.export_tvm(model, torch.randn(1, 16), tmp_path / "future.so", masks=masks).path
    with pytest.raises(VersionError, match="format 999.*Export the model again"):
        sparsecc.load_tvm(path)


def test_foreign_and_junk_files_are_refused(tmp_path):
    import tvm
    from tvm import relax

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2,), "float32"))
    with builder.function("main", params=[x]):
        builder.emit_func_output(x)
    tvm.compile(builder.get(), target="llvm").export_library(str(tmp_path / "plain.so"))
    with pytest.raises(VersionError, match="not written by sparsecc.export_tvm"):
        sparsecc.load_tvm(tmp_path / "plain.so")
    (tmp_path / "junk.so").write_bytes(b"\x7fELF not really")
    with pytest.raises(VersionError, match="not a TVM library"):
        sparsecc.load_tvm(tmp_path / "junk.so")
    with pytest.raises(VersionError, match="is not a file"):
        sparsecc.load_tvm(tmp_path / "missing.so")


def test_unsupported_ops_are_listed_in_one_error(tmp_path):
    model = Unexportable().eval()
    with pytest.raises(ExportError, match=r"2 op\(s\) have no TVM translation: sparsecc_test.first_unknown.*"
                                          r"sparsecc_test.second_unknown"):
        sparsecc.export_tvm(model, torch.randn(1, 8), tmp_path / "c.so",
                            masks={"fc.weight": synthetic.fanin_mask(model.fc.weight, 0.5)})
    assert list(tmp_path.iterdir()) == []


def test_missing_tvm_is_a_clear_error(tmp_path, monkeypatch):
    from sparsecc.runtimes.tvm import runtime as tvm_runtime

    monkeypatch.setattr(tvm_runtime, "unavailable", lambda: "apache-tvm is not importable (ImportError: x)")
    model, masks = _small(tmp_path)
    with pytest.raises(sparsecc.RuntimeUnavailableError, match="export_tvm needs TVM: apache-tvm is not importable"):
        sparsecc.export_tvm(model, torch.randn(1, 16), tmp_path / "m.so", masks=masks)
    assert list(tmp_path.iterdir()) == []


def test_argument_errors(tmp_path):
    model, masks = _small(tmp_path)
    with pytest.raises(InputError, match="float32"):
        sparsecc.export_tvm(model.double(), torch.randn(1, 16, dtype=torch.float64), tmp_path / "m.so", masks=masks)
    with pytest.raises(ExportError, match="does not exist"):
        sparsecc.export_tvm(model, torch.randn(1, 16), tmp_path / "no" / "m.so", masks=masks)
