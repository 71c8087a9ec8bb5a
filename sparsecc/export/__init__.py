"""Exports for deployment outside Python: ONNX files any ONNX runtime runs, the 2:4 check TensorRT needs,
TensorRT engines built from the dense-mode ONNX, and whole-model TVM libraries that run without PyTorch."""

from sparsecc.export.check import TwoFour, check_2to4
from sparsecc.export.onnx_file import OnnxExport, export_onnx
from sparsecc.export.tensorrt_engine import export_tensorrt
from sparsecc.export.tvm_library import TvmExport, export_tvm, load_tvm

__all__ = ["export_onnx", "OnnxExport", "check_2to4", "TwoFour", "export_tensorrt", "export_tvm", "TvmExport",
           "load_tvm"]
