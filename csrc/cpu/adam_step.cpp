// The fused projected-Adam step (one GaLore / Q-GaLore weight update) on CPU.
// Math: fastgrad/_reference.py::adam_direction_ and galore_adam_step_(quantized_|int8_):
//   M <- b1 M + (1 - b1) R ;  V <- b2 V + (1 - b2) R*R        (fp32, stored in M's dtype)
//   N  = M / (denom_scale sqrt(V) + eps)                      (from the fp32 M, V)
//   W <- decay W + step_scale up(N, P)                        (fp32, rounded once to W's dtype)
//   up: side "left" P (m x r) N (r x n); side "right" N (m x r) P (r x n)
// The INT8-weight form decodes W = code * scale + zero, applies the update in fp32 and
// re-quantizes it (asymmetric, W's group size, stochastic rounding with the Philox counter
// offset + i*n + j, or round-to-nearest), writing codes, scales and zeros back in place.
//
// Moments: one at::parallel_for over the r-sized tensors in 256-element chunks, each op rounded
// in fp32 exactly as the reference's tensor ops (no FMA: -ffp-contract=off), so M, V and N are
// bitwise the reference's; N goes to an fp32 scratch of R's size.
// Dense W: one GEMM with the decay as beta: W.addmm_(P, N | N, P, beta=decay, alpha=step_scale)
// for fp32 W and P; otherwise project_back_blocked (project_common.h): P decoded/upcast a block at
// a time, bf16/fp16 W staged in fp32 blocks. No m x n temporary.
// INT8 W: blocks of whole rows (about 2**18 elements, 1 MiB of fp32, as the reference's
// INT8_STEP_BLOCK_ELEMS) are decoded into an fp32 scratch S, S = decay S + step_scale up(N, P)[rows]
// by MKL (left: P's rows of the block decoded; right: N[rows] times P decoded in column blocks, or
// decoded once for all row blocks when P fits one block), and S is quantized by the one CPU quantizer (quant.cpp, cpu::quantize_f32) into the block's
// codes, scales and zeros, with counter offset + r0 * n. Groups lie within rows, so this is the
// quantizer of the whole updated matrix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <utility>

#include "project_common.h"

namespace fastgrad {
namespace {

using namespace cpu;  // NOLINT: the shared projection machinery of project_common.h

// Checks of R and Adam's moments M (exp_avg), V (exp_avg_sq): of R's shape, one float dtype,
// contiguous, on R's device; and of the hyper-parameters (fastgrad/_ops.py::check_adam_moments).
void check_moments(const char* op, const at::Tensor& r, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                   double beta1, double beta2, double eps, double denom_scale) {
  check_contiguous(op, "r", r);
  const std::initializer_list<std::pair<const char*, const at::Tensor&>> moments{{"exp_avg", exp_avg},
                                                                                 {"exp_avg_sq", exp_avg_sq}};
  for (const auto& [name, t] : moments) {
    check_float_dtype(op, name, t.scalar_type());
    FG_CHECK_ARG(t.sizes() == r.sizes(), op, name, "of r's shape ", r.sizes(), ", got ", t.sizes());
    check_contiguous(op, name, t);
  }
  check_same_dtype(op, "exp_avg_sq", exp_avg_sq.scalar_type(), "exp_avg", exp_avg.scalar_type());
  for (const auto& [name, t] : moments) check_same_device(op, name, t.device(), "r", r.device());
  const double inf = std::numeric_limits<double>::infinity();
  FG_CHECK_ARG(0.0 <= beta1 && beta1 < 1.0, op, "beta1", "in [0, 1), got ", beta1);
  FG_CHECK_ARG(0.0 <= beta2 && beta2 < 1.0, op, "beta2", "in [0, 1), got ", beta2);
  FG_CHECK_ARG(0.0 <= eps && eps < inf, op, "eps", "finite and >= 0, got ", eps);  // NaN fails
  FG_CHECK_ARG(0.0 < denom_scale && denom_scale < inf, op, "denom_scale", "finite and > 0, got ", denom_scale);
}

// The hyper-parameters as the reference's fp32 tensor ops see them (a Python float scalar is
// converted to the tensor's fp32 once; 1 - beta is formed in double first).
struct AdamScalars {
  float b1, c1, b2, c2, eps, ds;
};

// One chunk (k <= kChunk) in fp32, in place in m, v; n: the direction. Every operation is one
// correctly rounded fp32 op in the reference's order (setup.py's -ffp-contract=off keeps them
// unfused):  m = m*b1 + r*c1;  v = v*b2 + (r*r)*c2;  n = m / (sqrt(v)*ds + eps).
void adam_chunk(const float* __restrict r, float* __restrict m, float* __restrict v, float* __restrict n, int64_t k,
                const AdamScalars& s) {
  const float b1 = s.b1, c1 = s.c1, b2 = s.b2, c2 = s.c2, eps = s.eps, ds = s.ds;
  for (int64_t i = 0; i < k; ++i) {
    const float ri = r[i];
    const float mi = m[i] * b1 + ri * c1;
    const float vi = v[i] * b2 + (ri * ri) * c2;
    m[i] = mi;
    v[i] = vi;
    n[i] = mi / (std::sqrt(vi) * ds + eps);
  }
}

// exp_avg, exp_avg_sq: (numel,) mom_t, r: (numel,) r_t, all contiguous -> out: (numel,) fp32 N.
template <typename mom_t, typename r_t>
void adam_direction_kernel(mom_t* exp_avg, mom_t* exp_avg_sq, const r_t* r, int64_t numel, const AdamScalars& s,
                           float* out) {
  at::parallel_for(0, numel, int64_t{1} << 14, [&](int64_t begin, int64_t end) {
    alignas(64) float rb[kChunk];
    alignas(64) float mb[kChunk];
    alignas(64) float vb[kChunk];
    for (int64_t i = begin; i < end; i += kChunk) {
      const int64_t k = std::min(kChunk, end - i);
      load_f32(r + i, k, rb);
      load_f32(exp_avg + i, k, mb);
      load_f32(exp_avg_sq + i, k, vb);
      adam_chunk(rb, mb, vb, out + i, k, s);
      store_f32(mb, k, exp_avg + i);
      store_f32(vb, k, exp_avg_sq + i);
    }
  });
}

// f(T{}) for the C++ type T of a float dtype (checked by the caller).
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "fastgrad: unexpected dtype ", t);
  }
}

// Updates the moments in place and returns N (fp32, R's shape). Arguments checked by check_moments.
at::Tensor adam_direction(at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& r, double beta1,
                          double beta2, double eps, double denom_scale) {
  at::Tensor n = at::empty(r.sizes(), r.options().dtype(at::kFloat));
  const int64_t numel = r.numel();
  if (numel == 0) return n;
  const AdamScalars s{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta2), static_cast<float>(eps), static_cast<float>(denom_scale)};
  dispatch_float(exp_avg.scalar_type(), [&](auto mom_tag) {
    using mom_t = decltype(mom_tag);
    dispatch_float(r.scalar_type(), [&](auto r_tag) {
      using r_t = decltype(r_tag);
      adam_direction_kernel<mom_t, r_t>(exp_avg.data_ptr<mom_t>(), exp_avg_sq.data_ptr<mom_t>(),
                                        r.const_data_ptr<r_t>(), numel, s, n.data_ptr<float>());
    });
  });
  return n;
}

// W (m, n), any float dtype and strides: W = decay * W + step_scale * up(N, P), N fp32.
void dense_weight_update(at::Tensor& w, const at::Tensor& n, const Projector& p, bool left, double step_scale,
                         double decay) {
  if (w.scalar_type() == at::kFloat && !p.needs_scratch()) {  // one GEMM, the decay as beta
    if (left) {
      w.addmm_(p.dense, n, /*beta=*/decay, /*alpha=*/step_scale);
    } else {
      w.addmm_(n, p.dense, /*beta=*/decay, /*alpha=*/step_scale);
    }
    return;
  }
  project_back_blocked(n, p, left, step_scale, w, /*beta=*/decay);
}

// w: (m, n); exp_avg, exp_avg_sq, r: left (rank, n), right (m, rank); p: left (m, rank), right
// (rank, n) of r's dtype. In place: the moments and w.
void galore_adam_step_cpu(at::Tensor& w, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& r,
                          const at::Tensor& p, c10::string_view side_sv, double beta1, double beta2, double eps,
                          double denom_scale, double step_scale, double decay) {
  const char* op = "galore_adam_step_";
  const bool left = check_back_dense(op, r, p, side_sv);
  check_accumulator(op, w, r, left ? p.size(0) : r.size(0), left ? r.size(1) : p.size(1));
  check_moments(op, r, exp_avg, exp_avg_sq, beta1, beta2, eps, denom_scale);
  const at::Tensor n = adam_direction(exp_avg, exp_avg_sq, r, beta1, beta2, eps, denom_scale);
  dense_weight_update(w, n, dense_projector(p), left, step_scale, decay);
}

// As galore_adam_step_cpu with P quantized (see quantized_projector), decoded a block at a time.
void galore_adam_step_quantized_cpu(at::Tensor& w, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& r,
                                    const at::Tensor& p_codes, const at::Tensor& p_scales, const at::Tensor& p_zeros,
                                    int64_t bits, c10::string_view side_sv, double beta1, double beta2, double eps,
                                    double denom_scale, double step_scale, double decay) {
  const char* op = "galore_adam_step_quantized_";
  const Projector p = quantized_projector(op, p_codes, p_scales, p_zeros, bits);
  const bool left = check_back_quantized(op, r, p_codes, p, side_sv);
  check_accumulator(op, w, r, left ? p.rows : r.size(0), left ? r.size(1) : p.cols);
  check_moments(op, r, exp_avg, exp_avg_sq, beta1, beta2, eps, denom_scale);
  const at::Tensor n = adam_direction(exp_avg, exp_avg_sq, r, beta1, beta2, eps, denom_scale);
  dense_weight_update(w, n, p, left, step_scale, decay);
}

// Validates the INT8 weight (fastgrad/_ops.py::check_galore_adam_step_int8): codes (m, n) uint8,
// scales/zeros (m, groups) fp32 with groups dividing n, all contiguous, on r's device. Returns it
// as a Projector, whose tile() decodes a block of its rows.
Projector int8_weight(const char* op, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                      const at::Tensor& r, int64_t m, int64_t n) {
  check_2d(op, "w_codes", codes, " (m×n)");
  check_quantized(op, "w_", codes, scales, zeros, /*bits=*/8, /*matrix=*/true);
  const int64_t groups = scales.size(1);
  FG_CHECK_ARG(codes.size(0) == m && codes.size(1) == n, op, "w_codes", "of shape (", m, ", ", n, "), got ",
               codes.sizes());
  check_same_device(op, "w_codes", codes.device(), "r", r.device());
  Projector w;
  w.bits = 8;
  w.rows = m;
  w.cols = n;
  w.groups = groups;
  w.codes = codes.const_data_ptr<uint8_t>();
  w.scales = scales.const_data_ptr<float>();
  w.zeros = zeros.const_data_ptr<float>();
  return w;
}

// The INT8 weight (w_codes (m, n), w_scales/w_zeros (m, groups)) updated in place, a block of rows
// at a time (see the file comment); P quantized; the moments as in galore_adam_step_cpu.
void galore_adam_step_int8_cpu(at::Tensor& w_codes, at::Tensor& w_scales, at::Tensor& w_zeros, at::Tensor& exp_avg,
                               at::Tensor& exp_avg_sq, const at::Tensor& r, const at::Tensor& p_codes,
                               const at::Tensor& p_scales, const at::Tensor& p_zeros, int64_t bits,
                               c10::string_view side_sv, double beta1, double beta2, double eps, double denom_scale,
                               double step_scale, double decay, bool stochastic, int64_t seed, int64_t offset) {
  const char* op = "galore_adam_step_int8_";
  const Projector p = quantized_projector(op, p_codes, p_scales, p_zeros, bits);
  const bool left = check_back_quantized(op, r, p_codes, p, side_sv);
  const int64_t m = left ? p.rows : r.size(0), n = left ? r.size(1) : p.cols;
  const Projector w = int8_weight(op, w_codes, w_scales, w_zeros, r, m, n);
  check_moments(op, r, exp_avg, exp_avg_sq, beta1, beta2, eps, denom_scale);
  check_seed_offset(op, seed, offset, w_codes.numel());

  const at::Tensor dir = adam_direction(exp_avg, exp_avg_sq, r, beta1, beta2, eps, denom_scale);
  if (m == 0 || n == 0) return;
  const int64_t rank = left ? p.cols : p.rows;
  const int64_t group = n / w.groups;
  const auto f32 = r.options().dtype(at::kFloat);
  // right: P (rank, n) decoded in blocks of its columns, reused by every row block
  const ScratchPlan plan = int8_step_scratch(m, n, rank, left, p.numel());
  const int64_t block_rows = plan.other / n;
  const int64_t col_blk = left ? n : plan.len;
  at::Tensor w_scratch = at::empty({plan.other}, f32);
  at::Tensor p_scratch = at::empty({plan.p}, f32);
  // right, P within one block: decoded once, for every row block (not once per row block)
  const at::Tensor p_whole = (!left && col_blk >= n) ? p.tile(0, rank, 0, n, p_scratch) : at::Tensor();
  uint8_t* codes = w_codes.data_ptr<uint8_t>();
  float* scales = w_scales.data_ptr<float>();
  float* zeros = w_zeros.data_ptr<float>();
  for (int64_t r0 = 0; r0 < m; r0 += block_rows) {
    const int64_t r1 = std::min(m, r0 + block_rows);
    at::Tensor s = w.tile(r0, r1, 0, n, w_scratch);  // decoded rows (r1 - r0, n), fp32
    if (left) {  // S = decay S + step_scale P[r0:r1, :] (rows, rank) @ N (rank, n)
      at::addmm_out(s, s, p.tile(r0, r1, 0, rank, p_scratch), dir, /*beta=*/decay, /*alpha=*/step_scale);
    } else if (p_whole.defined()) {  // S = decay S + step_scale N[r0:r1, :] (rows, rank) @ P (rank, n)
      at::addmm_out(s, s, dir.slice(0, r0, r1), p_whole, /*beta=*/decay, /*alpha=*/step_scale);
    } else {  // S[:, c0:c1] = decay S[:, c0:c1] + step_scale N[r0:r1, :] (rows, rank) @ P[:, c0:c1] (rank, cols)
      const at::Tensor n_rows = dir.slice(0, r0, r1);
      for (int64_t c0 = 0; c0 < n; c0 += col_blk) {
        const int64_t c1 = std::min(n, c0 + col_blk);
        at::Tensor sc = s.slice(1, c0, c1);
        at::addmm_out(sc, sc, n_rows, p.tile(0, rank, c0, c1, p_scratch), /*beta=*/decay, /*alpha=*/step_scale);
      }
    }
    quantize_f32(s.const_data_ptr<float>(), (r1 - r0) * n, group, /*bits=*/8, /*symmetric=*/false, stochastic,
                 static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + static_cast<uint64_t>(r0 * n),
                 codes + r0 * n, scales + r0 * w.groups, zeros + r0 * w.groups);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgrad, CPU, m) {
  m.impl("galore_adam_step_", &galore_adam_step_cpu);
  m.impl("galore_adam_step_quantized_", &galore_adam_step_quantized_cpu);
  m.impl("galore_adam_step_int8_", &galore_adam_step_int8_cpu);
}

}  // namespace fastgrad
