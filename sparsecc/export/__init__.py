"""Writers for deployment outside Python: ONNX files any ONNX runtime runs (`onnx_file`), the 2:4 check
TensorRT needs (`check`), TensorRT engines built from the dense-mode ONNX (`tensorrt_engine`), and whole-model
TVM libraries that run without PyTorch (`tvm_library`, loaded by `tvm_runner`). They take compiled models;
`sparsecc.exports` holds the public functions that compile first when needed. Nothing is imported here, so
the writers import no entry point of sparsecc."""
