"""Everything of the TVM backend: the op runtime (`runtime`: bindings per op), the TensorIR kernels
(`kernels`), the on-disk kernel cache (`cache`), the OpenMP launcher (`parallel`, `parallel.c`), the
whole-model library writer with its Relax converters per op (`library`) and the runner that loads a library
without PyTorch (`runner`). Nothing is imported here: `runner` must import without torch."""
