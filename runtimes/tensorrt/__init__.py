"""Everything of the TensorRT backend: the engine (`engine`, GPU) and the engine writer from the dense-mode ONNX
(`writer`)."""
