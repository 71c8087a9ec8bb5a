"""sparsecc: compile trained sparse PyTorch models into condensed operators that actually run faster."""

from sparsecc import ops  # noqa: F401  (registers the sparsecc:: custom ops)
from sparsecc.api import CompiledModel, compile, inspect, masked_reference, validate
from sparsecc.errors import (EquivalenceError, ExportError, InputError, MaskError, PassError,
                             RuntimeUnavailableError, SparseccError, SparseccWarning, VersionError, WeightError)
from sparsecc.export import check_2to4, export_onnx, export_tensorrt, export_tvm, load_tvm
from sparsecc.report import Report
from sparsecc.serialize import load, save
from sparsecc.sparsify import SparsifyReport, sparsify
from sparsecc import swat  # TopKLinear, TopKConv2d, swatify

__version__ = "0.1.0"

__all__ = ["compile", "inspect", "validate", "masked_reference", "CompiledModel", "Report", "save", "load",
           "export_onnx", "check_2to4", "export_tensorrt", "export_tvm", "load_tvm", "sparsify", "SparsifyReport",
           "swat", "SparseccError", "MaskError", "WeightError", "PassError", "InputError", "EquivalenceError",
           "ExportError", "RuntimeUnavailableError", "SparseccWarning", "VersionError", "__version__"]
