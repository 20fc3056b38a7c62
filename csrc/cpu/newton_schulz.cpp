// Newton–Schulz orthogonalization on CPU (Muon). Math: fastgrad/_reference.py::newton_schulz,
// per matrix X (m x n) of x (..., m, n):
//   Y = X (X^T if m > n);  Y <- Y / max(||Y||_F, eps)
//   per step (a, b, c):  A = Y Y^T;  B = b A + c A A;  Y = a Y + B Y
//   result Y (transposed back if m > n), x's shape and dtype.
//
// Bitwise contract: the result of every matrix is bitwise that of torch.optim.Muon's op sequence
// (torch 2.13 _zeropower_via_newtonschulz), so this kernel makes the same ATen calls on operands of
// the same layouts, in the same order: Tensor.norm() is at::linalg_vector_norm(y, 2), then
// clamp(min=eps), div, and per step at::mm / at::addmm (torch's CPU GEMMs, for fp32 and bf16 alike
// accumulating in fp32 and rounding each op's result to x's dtype). The Gram matrix A, the update
// B and the iterate Y live in buffers allocated once per call (mm_out / addmm_out into a contiguous
// buffer run exactly the kernel that the functional mm / addmm runs on its own contiguous result),
// and the last step of a wide or square matrix writes straight into the output. The GEMMs are all
// the time: on CPU this is at parity with the Python sequence (bench/bench_newton_schulz.py); a tall
// matrix pays one extra transposing copy for the contiguous output.
// A batch is processed one matrix at a time (a batched GEMM need not be bitwise the 2-d GEMM).
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "../common/checks.h"

namespace fastgrad {
namespace {

// The checks of fastgrad/_ops.py::check_newton_schulz, worded alike.
void check_newton_schulz(const char* op, const at::Tensor& x, c10::ArrayRef<double> coefficients, double eps) {
  const at::ScalarType t = x.scalar_type();
  FG_CHECK_ARG(t == at::kFloat || t == at::kBFloat16, op, "x", "float32 or bfloat16, got ", py_dtype(t));
  FG_CHECK_ARG(x.dim() >= 2, op, "x", "a tensor with at least 2 dimensions (..., m, n), got a ", x.dim(),
               "-d tensor");
  const size_t k = coefficients.size();
  FG_CHECK_ARG(k > 0 && k % 3 == 0, op, "coefficients",
               "a non-empty list of (a, b, c) triples (length a multiple of 3), got ", k, " values");
  for (const double c : coefficients) FG_CHECK_ARG(std::isfinite(c), op, "coefficients", "finite, got [", c, "]");
  FG_CHECK_ARG(eps > 0.0 && std::isfinite(eps), op, "eps", "finite and > 0, got ", eps);
}

// The buffers of one call, reused across the matrices of a batch and across steps.
struct Buffers {
  at::Tensor gram, update;  // A, B: (s, s)
  at::Tensor y[2];          // the iterate, ping-pong: (s, l)
};

// One matrix x (m, n), any strides -> written into out (m, n), contiguous.
void newton_schulz_matrix(const at::Tensor& x, c10::ArrayRef<double> coefficients, double eps, Buffers& buf,
                          at::Tensor& out) {
  const bool transposed = x.size(0) > x.size(1);
  at::Tensor y = transposed ? x.t() : x;
  // torch: y.div_(y.norm().clamp(min=eps)); y.norm() is at::linalg_vector_norm(y, 2) in y's dtype.
  const at::Tensor norm = at::clamp(at::linalg_vector_norm(y, 2, std::nullopt, false, std::nullopt), eps);
  y = at::div(y, norm);
  const size_t steps = coefficients.size() / 3;
  for (size_t i = 0; i < steps; ++i) {
    const double a = coefficients[3 * i], b = coefficients[3 * i + 1], c = coefficients[3 * i + 2];
    at::mm_out(buf.gram, y, y.t());                                 // A = Y Y^T
    at::addmm_out(buf.update, buf.gram, buf.gram, buf.gram, b, c);  // B = b A + c A A
    // Y = a Y + B Y, never in place (Y is an operand): into the other buffer, or for the last step
    // of a wide matrix straight into the (contiguous) output.
    at::Tensor& next = (i + 1 == steps && !transposed) ? out : buf.y[i % 2];
    at::addmm_out(next, y, buf.update, y, a, 1);
    y = next;
  }
  if (transposed) out.copy_(y.t());
}

// x: (..., m, n) float32/bfloat16, any strides (made contiguous) -> (..., m, n) of x's dtype, contiguous.
at::Tensor newton_schulz_cpu(const at::Tensor& x_in, c10::ArrayRef<double> coefficients, double eps) {
  const char* op = "newton_schulz";
  check_newton_schulz(op, x_in, coefficients, eps);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(-2), n = x.size(-1);
  const int64_t s = std::min(m, n), l = std::max(m, n);
  const int64_t batch = c10::multiply_integers(x.sizes().slice(0, x.dim() - 2));
  at::Tensor out = at::empty(x.sizes(), x.options());
  const at::Tensor flat = x.view({batch, m, n});
  const at::Tensor flat_out = out.view({batch, m, n});
  Buffers buf;
  buf.gram = at::empty({s, s}, x.options());
  buf.update = at::empty({s, s}, x.options());
  for (at::Tensor& t : buf.y) t = at::empty({s, l}, x.options());
  for (int64_t i = 0; i < flat.size(0); ++i) {
    at::Tensor dst = flat_out.select(0, i);
    newton_schulz_matrix(flat.select(0, i), coefficients, eps, buf, dst);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgrad, CPU, m) { m.impl("newton_schulz", &newton_schulz_cpu); }

}  // namespace fastgrad
