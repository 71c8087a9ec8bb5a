"""sparsecc: compile trained sparse PyTorch models into condensed operators that actually run faster."""

from sparsecc import swat  # TopKLinear, TopKConv2d, swatify
from sparsecc.api import CompiledModel, compile, inspect, masked_reference, validate
from sparsecc.core import patterns  # noqa: F401  (registers the patterns and their sparsecc:: custom ops)
from sparsecc.core.errors import (EquivalenceError, ExportError, InputError, MaskError, PassError,
                                  RuntimeUnavailableError, SparseccError, SparseccWarning, VersionError, WeightError)
from sparsecc.core.report import Report
from sparsecc.core.version import __version__
from sparsecc.exports import export_onnx, export_tensorrt, export_triton, export_tvm
from sparsecc.runtimes.onnxruntime.writer import OnnxExport
from sparsecc.runtimes.onnxruntime.check import TwoFour, check_2to4
from sparsecc.runtimes.triton.writer import TritonExport
from sparsecc.runtimes.tvm.library import TvmExport, load_tvm
from sparsecc.serialize import load, save
from sparsecc.sparsify import SparsifyReport, sparsify

__all__ = ["compile", "inspect", "validate", "masked_reference", "CompiledModel", "Report", "save", "load",
           "export_onnx", "OnnxExport", "check_2to4", "TwoFour", "export_tensorrt", "export_tvm", "TvmExport",
           "export_triton", "TritonExport", "load_tvm", "sparsify", "SparsifyReport", "swat", "SparseccError",
           "MaskError", "WeightError", "PassError", "InputError", "EquivalenceError", "ExportError",
           "RuntimeUnavailableError", "SparseccWarning", "VersionError", "__version__"]
