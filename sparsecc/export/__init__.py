"""Exports for deployment outside Python: ONNX files any ONNX runtime runs, the 2:4 check TensorRT needs,
and TensorRT engines built from the dense-mode ONNX."""

from sparsecc.export.check import TwoFour, check_2to4
from sparsecc.export.onnx_file import OnnxExport, export_onnx
from sparsecc.export.tensorrt_engine import export_tensorrt

__all__ = ["export_onnx", "OnnxExport", "check_2to4", "TwoFour", "export_tensorrt"]
