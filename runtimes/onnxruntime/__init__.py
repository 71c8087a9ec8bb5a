"""Everything of the ONNX / onnxruntime backend: the standard-ONNX forms of the condensed ops (`forms`), the
file writer (`writer`, which TensorRT and Triton build on), the check of which weights of a file TensorRT reads
as 2:4 (`check`) and the engine that runs a file in an InferenceSession (`engine`)."""
