"""Triton Inference Server: a model repository (`writer`) with the onnxruntime file and, on a GPU machine, a
TensorRT plan."""
