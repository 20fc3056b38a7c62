// fastgrad._C: the Python module that carries every C++/CUDA kernel. Importing it runs the
// static TORCH_LIBRARY_IMPL registrations in csrc/cpu/*.cpp and csrc/cuda/*.cu; the op schemas
// themselves are defined in Python (fastgrad/_ops.py), which is imported first. It also exports the
// scratch plans of the blocked CPU kernels (cpu/project_common.h), which the memory model calls.
#include <torch/extension.h>

#include <tuple>

#include "cpu/project_common.h"

namespace {
std::tuple<int64_t, int64_t, int64_t> as_tuple(const fastgrad::cpu::ScratchPlan& s) { return {s.len, s.p, s.other}; }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastgrad compiled kernels (registered with the PyTorch dispatcher on import)";
#ifdef FASTGRAD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // Each returns (block length, fp32 elements of the P block, fp32 elements of the other block).
  m.def(
      "projection_scratch",
      [](int64_t total, int64_t rank, int64_t other, int64_t p_numel, bool p_in_place, bool other_in_place) {
        return as_tuple(fastgrad::cpu::projection_scratch(total, rank, other, p_numel, p_in_place, other_in_place));
      },
      "scratch of the blocked projections, down (project_blocked) and up (project_back_blocked)");
  m.def(
      "tn_matmul_scratch",
      [](int64_t T, int64_t k1, int64_t k2, bool a_f32, bool b_f32) {
        return as_tuple(fastgrad::cpu::tn_matmul_scratch(T, k1, k2, a_f32, b_f32));
      },
      "scratch of A^T B over T rows (lowrank_grad's second product)");
  m.def(
      "int8_step_scratch",
      [](int64_t m_, int64_t n, int64_t rank, bool left, int64_t p_numel) {
        return as_tuple(fastgrad::cpu::int8_step_scratch(m_, n, rank, left, p_numel));
      },
      "scratch of the fused INT8-weight Adam step (decoded rows of W, block of P)");
}
