// fastgrad._C: the Python module that carries every C++/CUDA kernel. Importing it runs the
// static TORCH_LIBRARY_IMPL registrations in csrc/cpu/*.cpp and csrc/cuda/*.cu; the op schemas
// themselves are defined in Python (fastgrad/_ops.py), which is imported first.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastgrad compiled kernels (registered with the PyTorch dispatcher on import)";
#ifdef FASTGRAD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
