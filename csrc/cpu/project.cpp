// Low-rank projection of a gradient on CPU, with a dense projector P or a group-wise INT4/INT8
// quantized one whose dequantization is fused into the matmul.
// Math: fastgrad/_reference.py::lowrank_project(_back)(_quantized) and lowrank_grad(_quantized):
//   side "left":  P (m x r), down R = P^T G (r x n), up scale * P R (m x n)
//   side "right": P (r x n), down R = G P^T (m x r), up scale * R P (m x n)
// fp32 accumulation; the result has G's (or R's) dtype.
//
// fp32, dense P: one at::mm / at::addmm (MKL). Otherwise the work runs block by block along the
// dimension of P that is not the rank (rows of P for "left", columns for "right"): each block of P
// is decoded (quantized P, group layout along P's rows as in the reference `dequantize`) or
// upcast (bf16/fp16 P) into a small fp32 scratch, bf16/fp16 operands likewise, and MKL does the
// block's GEMM (accumulating into the output for the down projection, writing the output block
// for the up projection). The dense P is never materialized: the extra cost over a dense fp32
// matmul is an O(m r) decode plus one pass over the low-precision operands. The projector, its
// checks and the blocked up projection live in project_common.h (shared with adam_step.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "project_common.h"

namespace fastgrad {
namespace {

using namespace cpu;  // NOLINT: the shared projection machinery of project_common.h

// An fp32 view of `t` (fp32) or an upcast copy of it in `scratch`.
at::Tensor as_f32(const at::Tensor& t, const at::Tensor& scratch) {
  if (t.scalar_type() == at::kFloat) return t;
  return scratch.narrow(0, 0, t.numel()).view(t.sizes()).copy_(t);
}

// Down projection. g: (m, n), any strides; P: left (m, r), right (r, n) -> (r, n) / (m, r) of g's
// dtype, or fp32 when `f32_out`.
at::Tensor project_blocked(const at::Tensor& g, const Projector& p, bool left, bool f32_out = false) {
  const int64_t m = g.size(0), n = g.size(1);
  const int64_t rank = left ? p.cols : p.rows;
  const bool g_f32 = g.scalar_type() == at::kFloat;
  at::Tensor out = left ? at::empty({rank, n}, g.options().dtype(at::kFloat))
                        : at::empty({m, rank}, g.options().dtype(at::kFloat));
  const int64_t red = left ? m : n;  // the reduction dimension, split into blocks
  const bool keep_f32 = g_f32 || f32_out;
  if (red == 0 || out.numel() == 0) return keep_f32 ? out.zero_() : out.zero_().to(g.scalar_type());
  const ScratchPlan plan = projection_scratch(red, rank, left ? n : m, p.numel(), !p.needs_scratch(), g_f32);
  const int64_t blk = plan.len;
  at::Tensor p_scratch = plan.p ? at::empty({plan.p}, out.options()) : at::Tensor();
  at::Tensor g_scratch = plan.other ? at::empty({plan.other}, out.options()) : at::Tensor();
  for (int64_t b0 = 0; b0 < red; b0 += blk) {
    const int64_t b1 = std::min(red, b0 + blk);
    at::Tensor a, bm;
    if (left) {  // out (r, n) += P[b0:b1, :]^T (r, blk) @ G[b0:b1, :] (blk, n)
      a = p.tile(b0, b1, 0, rank, p_scratch).t();
      bm = as_f32(g.slice(0, b0, b1), g_scratch);
    } else {  // out (m, r) += G[:, b0:b1] (m, blk) @ P[:, b0:b1]^T (blk, r)
      a = as_f32(g.slice(1, b0, b1), g_scratch);
      bm = p.tile(0, rank, b0, b1, p_scratch).t();
    }
    if (b0 == 0) {
      at::mm_out(out, a, bm);
    } else {
      out.addmm_(a, bm);
    }
  }
  return keep_f32 ? out : out.to(g.scalar_type());
}

// fp32 (k1, k2) = A^T B for A (T, k1) and B (T, k2) of any float dtypes and strides: one GEMM
// in fp32, otherwise blocks of T rows upcast into a scratch and accumulated.
at::Tensor tn_matmul_f32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat) return at::mm(a.t(), b);
  const int64_t T = a.size(0), k1 = a.size(1), k2 = b.size(1);
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor out = at::zeros({k1, k2}, f32);
  if (T == 0 || out.numel() == 0) return out;
  const ScratchPlan plan = tn_matmul_scratch(T, k1, k2, a.scalar_type() == at::kFloat, b.scalar_type() == at::kFloat);
  const int64_t blk = plan.len;
  at::Tensor a_scratch = plan.p ? at::empty({plan.p}, f32) : at::Tensor();
  at::Tensor b_scratch = plan.other ? at::empty({plan.other}, f32) : at::Tensor();
  for (int64_t t0 = 0; t0 < T; t0 += blk) {
    const int64_t t1 = std::min(T, t0 + blk);
    out.addmm_(as_f32(a.slice(0, t0, t1), a_scratch).t(), as_f32(b.slice(0, t0, t1), b_scratch));
  }
  return out;
}

// The projected weight gradient R = down(dy^T x, P) without forming the (m, n) gradient, through a
// (T, r) fp32 intermediate Z. dy (T, m), x (T, n) of one dtype; P: left (m, r), right (r, n).
//   right: Z = x P^T (T, r), R = dy^T Z (m, r).   left: Z^T = P^T dy^T (r, T), R = Z^T x (r, n).
at::Tensor lowrank_grad_impl(const at::Tensor& dy, const at::Tensor& x, const Projector& p, bool left) {
  const bool all_f32 = dy.scalar_type() == at::kFloat && !p.needs_scratch();
  at::Tensor out;
  if (left) {
    const at::Tensor zt = all_f32 ? at::mm(p.dense.t(), dy.t()) : project_blocked(dy.t(), p, true, true);
    out = tn_matmul_f32(zt.t(), x);
  } else {
    const at::Tensor z = all_f32 ? at::mm(x, p.dense.t()) : project_blocked(x, p, false, true);
    out = tn_matmul_f32(dy, z);
  }
  return out.scalar_type() == dy.scalar_type() ? out : out.to(dy.scalar_type());
}

// Checks shared by lowrank_grad(_quantized): dy (T, m), x (T, n) float of one dtype on one device;
// P's dense shape (p_rows, p_cols) left (m, r), right (r, n).
bool check_grad(const char* op, const at::Tensor& dy, const at::Tensor& x, int64_t p_rows, int64_t p_cols,
                const at::Device& p_device, c10::string_view side_sv) {
  const bool left = check_side(op, std::string(side_sv));
  check_float_dtype(op, "dy", dy.scalar_type());
  check_2d(op, "dy", dy, " (tokens×m)");
  check_2d(op, "x", x, " (tokens×n)");
  check_same_dtype(op, "x", x.scalar_type(), "dy", dy.scalar_type());
  check_same_device(op, "x", x.device(), "dy", dy.device());
  FG_CHECK_ARG(x.size(0) == dy.size(0), op, "x", "with dy's ", dy.size(0), " rows (tokens), got ", x.sizes());
  check_same_device(op, "p", p_device, "dy", dy.device());
  if (left) {
    FG_CHECK_ARG(p_rows == dy.size(1), op, "p", "of shape (", dy.size(1), ", r) for side='left' with dy of shape ",
                 dy.sizes(), ", got (", p_rows, ", ", p_cols, ")");
  } else {
    FG_CHECK_ARG(p_cols == x.size(1), op, "p", "of shape (r, ", x.size(1), ") for side='right' with x of shape ",
                 x.sizes(), ", got (", p_rows, ", ", p_cols, ")");
  }
  return left;
}

// g: (m, n) float32/bfloat16/float16; p: left (m, r), right (r, n) of g's dtype
// -> left (r, n), right (m, r) of g's dtype.
at::Tensor lowrank_project_cpu(const at::Tensor& g, const at::Tensor& p, c10::string_view side_sv) {
  const char* op = "lowrank_project";
  check_2d(op, "p", p);
  const Projector proj = dense_projector(p);
  const bool left = check_projection(op, /*up=*/false, g, side_sv, proj, p.device());
  if (g.scalar_type() == at::kFloat) return left ? at::mm(p.t(), g) : at::mm(g, p.t());
  return project_blocked(g, proj, left);
}

// r: left (rank, n), right (m, rank); p: left (m, rank), right (rank, n) of r's dtype
// -> (m, n) of r's dtype.
at::Tensor lowrank_project_back_cpu(const at::Tensor& r, const at::Tensor& p, c10::string_view side_sv, double scale) {
  const bool left = check_back_dense("lowrank_project_back", r, p, side_sv);
  at::Tensor out = at::empty({left ? p.size(0) : r.size(0), left ? r.size(1) : p.size(1)}, r.options());
  if (r.scalar_type() == at::kFloat && out.numel() > 0) {
    // One GEMM: out = scale * (P R | R P); beta = 0, so the uninitialized out is never read.
    if (left) return at::addmm_out(out, out, p, r, /*beta=*/0, /*alpha=*/scale);
    return at::addmm_out(out, out, r, p, /*beta=*/0, /*alpha=*/scale);
  }
  project_back_blocked(r, dense_projector(p), left, scale, out, /*beta=*/0.0);
  return out;
}

// In place: w (m, n), any float dtype, += scale * (P R | R P). r: left (rank, n), right (m, rank);
// p: left (m, rank), right (rank, n) of r's dtype.
void lowrank_project_back_add_cpu(at::Tensor& w, const at::Tensor& r, const at::Tensor& p, c10::string_view side_sv,
                                  double scale) {
  const char* op = "lowrank_project_back_add_";
  const bool left = check_back_dense(op, r, p, side_sv);
  check_accumulator(op, w, r, left ? p.size(0) : r.size(0), left ? r.size(1) : p.size(1));
  if (w.scalar_type() == at::kFloat && r.scalar_type() == at::kFloat && p.scalar_type() == at::kFloat) {
    if (left) {
      w.addmm_(p, r, /*beta=*/1, /*alpha=*/scale);
    } else {
      w.addmm_(r, p, /*beta=*/1, /*alpha=*/scale);
    }
    return;
  }
  project_back_blocked(r, dense_projector(p), left, scale, w, /*beta=*/1.0);
}

// g: (m, n) float32/bfloat16/float16; P (dense shape left (m, r), right (r, n)) given as
// p_codes/p_scales/p_zeros (see quantized_projector) -> left (r, n), right (m, r) of g's dtype.
at::Tensor lowrank_project_quantized_cpu(const at::Tensor& g, const at::Tensor& p_codes, const at::Tensor& p_scales,
                                         const at::Tensor& p_zeros, int64_t bits, c10::string_view side_sv) {
  const char* op = "lowrank_project_quantized";
  const Projector p = quantized_projector(op, p_codes, p_scales, p_zeros, bits);
  const bool left = check_projection(op, /*up=*/false, g, side_sv, p, p_codes.device());
  return project_blocked(g, p, left);
}

// r: left (rank, n), right (m, rank); P (dense shape left (m, rank), right (rank, n)) quantized
// -> (m, n) of r's dtype.
at::Tensor lowrank_project_back_quantized_cpu(const at::Tensor& r, const at::Tensor& p_codes,
                                              const at::Tensor& p_scales, const at::Tensor& p_zeros, int64_t bits,
                                              c10::string_view side_sv, double scale) {
  const char* op = "lowrank_project_back_quantized";
  const Projector p = quantized_projector(op, p_codes, p_scales, p_zeros, bits);
  const bool left = check_back_quantized(op, r, p_codes, p, side_sv);
  at::Tensor out = at::empty({left ? p.rows : r.size(0), left ? r.size(1) : p.cols}, r.options());
  project_back_blocked(r, p, left, scale, out, /*beta=*/0.0);
  return out;
}

// In place: w (m, n), any float dtype, += scale * (P R | R P) with a quantized P.
void lowrank_project_back_quantized_add_cpu(at::Tensor& w, const at::Tensor& r, const at::Tensor& p_codes,
                                            const at::Tensor& p_scales, const at::Tensor& p_zeros, int64_t bits,
                                            c10::string_view side_sv, double scale) {
  const char* op = "lowrank_project_back_quantized_add_";
  const Projector p = quantized_projector(op, p_codes, p_scales, p_zeros, bits);
  const bool left = check_back_quantized(op, r, p_codes, p, side_sv);
  check_accumulator(op, w, r, left ? p.rows : r.size(0), left ? r.size(1) : p.cols);
  project_back_blocked(r, p, left, scale, w, /*beta=*/1.0);
}

// dy (T, m), x (T, n); p: left (m, r), right (r, n) of dy's dtype -> left (r, n), right (m, r).
at::Tensor lowrank_grad_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& p, c10::string_view side_sv) {
  const char* op = "lowrank_grad";
  check_2d(op, "p", p);
  const bool left = check_grad(op, dy, x, p.size(0), p.size(1), p.device(), side_sv);
  check_same_dtype(op, "p", p.scalar_type(), "dy", dy.scalar_type());
  return lowrank_grad_impl(dy, x, dense_projector(p), left);
}

// As lowrank_grad_cpu with P quantized (see quantized_projector).
at::Tensor lowrank_grad_quantized_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& p_codes,
                                      const at::Tensor& p_scales, const at::Tensor& p_zeros, int64_t bits,
                                      c10::string_view side_sv) {
  const char* op = "lowrank_grad_quantized";
  const Projector p = quantized_projector(op, p_codes, p_scales, p_zeros, bits);
  const bool left = check_grad(op, dy, x, p.rows, p.cols, p_codes.device(), side_sv);
  return lowrank_grad_impl(dy, x, p, left);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgrad, CPU, m) {
  m.impl("lowrank_grad", &lowrank_grad_cpu);
  m.impl("lowrank_grad_quantized", &lowrank_grad_quantized_cpu);
  m.impl("lowrank_project", &lowrank_project_cpu);
  m.impl("lowrank_project_back", &lowrank_project_back_cpu);
  m.impl("lowrank_project_quantized", &lowrank_project_quantized_cpu);
  m.impl("lowrank_project_back_quantized", &lowrank_project_back_quantized_cpu);
  m.impl("lowrank_project_back_add_", &lowrank_project_back_add_cpu);
  m.impl("lowrank_project_back_quantized_add_", &lowrank_project_back_quantized_add_cpu);
}

}  // namespace fastgrad
