// The blocked low-rank projection machinery shared by csrc/cpu/project.cpp (lowrank_* ops) and
// csrc/cpu/adam_step.cpp (galore_adam_step_* ops): the projector P, dense or group-wise quantized,
// decoded a block at a time (Projector::tile), never as a dense fp32 copy; the checks of P, R and
// the in-place target W; and the blocked up projection out = beta * out + scale * up(R, P).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>

#include "../common/checks.h"
#include "quant_common.h"

namespace fastgrad {
namespace cpu {

// fp32 elements of a P block in scratch: at least 1 MiB, at most an eighth of P (a projector is
// skinny and fits in one or two blocks; an INT8 weight used as P by QLinear is decoded in 8 blocks
// or more, few enough that the GEMMs stay efficient, never as a dense copy). And of a block of a
// converted bf16/fp16 G or of an fp32 output block staged before conversion (4 MiB).
inline constexpr int64_t kPBlockElems = int64_t{1} << 18;
inline constexpr int64_t kPBlockFraction = 8;
inline constexpr int64_t kGBlockElems = int64_t{1} << 20;
inline constexpr int64_t kMinBlock = 64;

// fp32 elements of the INT8 weight the fused step decodes at once, whole rows (adam_step.cpp).
inline constexpr int64_t kInt8StepBlockElems = int64_t{1} << 18;

// Length of a block along a dimension of size `total` whose slices hold `width` elements each:
// at most `budget` elements per block, a multiple of kMinBlock, at least kMinBlock.
inline int64_t block_len(int64_t total, int64_t width, int64_t budget) {
  int64_t len = std::max<int64_t>(kMinBlock, (budget / std::max<int64_t>(width, 1)) / kMinBlock * kMinBlock);
  return std::min(len, std::max<int64_t>(total, 1));
}

// ---- scratch plans ---------------------------------------------------------------------------------
// Each blocked kernel sizes its fp32 scratch with one of these functions; fastgrad._C exports them
// (csrc/module.cpp) so that the memory model (fastgrad/train/memory/scratch.py) counts the same bytes.

// fp32 elements of one decoded block of a P of p_numel elements (see kPBlockElems).
inline int64_t p_block_budget(int64_t p_numel) { return std::max(kPBlockElems, p_numel / kPBlockFraction); }

struct ScratchPlan {
  int64_t len;    // block length along the split dimension
  int64_t p;      // fp32 elements of the P block (0: P is used in place)
  int64_t other;  // fp32 elements of the G / output / operand block (0: used in place)
};

// project_blocked (down) and project_back_blocked (up): P split along `total` (the reduction
// dimension, or the output's rows/columns) into blocks of `rank` wide slices, decoded unless
// p_in_place; the other operand (G, or the output) staged block by block unless other_in_place,
// slices `other` wide.
inline ScratchPlan projection_scratch(int64_t total, int64_t rank, int64_t other, int64_t p_numel, bool p_in_place,
                                      bool other_in_place) {
  int64_t len = block_len(total, rank, p_block_budget(p_numel));
  if (!other_in_place) len = std::min(len, block_len(total, other, kGBlockElems));
  return {len, p_in_place ? 0 : len * rank, other_in_place ? 0 : len * other};
}

// tn_matmul_f32: A^T B for A (T, k1), B (T, k2), blocks of T rows of a non-fp32 operand upcast.
inline ScratchPlan tn_matmul_scratch(int64_t T, int64_t k1, int64_t k2, bool a_f32, bool b_f32) {
  const int64_t len = block_len(T, k1 + k2, kGBlockElems);
  return {len, a_f32 ? 0 : len * k1, b_f32 ? 0 : len * k2};
}

// galore_adam_step_int8_: blocks of whole rows of the (m, n) INT8 weight decoded (`other`), and
// P's block (`p`): left the rows' (rows, rank) slice, right (rank, len) column blocks of P.
inline ScratchPlan int8_step_scratch(int64_t m, int64_t n, int64_t rank, bool left, int64_t p_numel) {
  const int64_t rows = std::min(m, std::max<int64_t>(1, kInt8StepBlockElems / std::max<int64_t>(n, 1)));
  const int64_t cols = left ? n : block_len(n, rank, p_block_budget(p_numel));
  return {left ? rows : cols, (left ? rows : cols) * rank, rows * n};
}

// The projector P (rows x cols), dense (any float dtype) or quantized (codes + fp32 scales/zeros,
// groups along each row). tile() gives P[r0:r1, c0:c1] as an fp32 matrix: a view of a dense fp32
// P, otherwise decoded/upcast into `scratch` (at least (r1-r0)*(c1-c0) fp32 elements).
struct Projector {
  at::Tensor dense;  // defined for a dense P
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;
  const float* zeros = nullptr;
  int bits = 8;
  int64_t rows = 0, cols = 0, groups = 0;

  bool needs_scratch() const { return !dense.defined() || dense.scalar_type() != at::kFloat; }

  int64_t numel() const { return rows * cols; }

  at::Tensor tile(int64_t r0, int64_t r1, int64_t c0, int64_t c1, const at::Tensor& scratch) const {
    const int64_t h = r1 - r0, w = c1 - c0;
    if (dense.defined()) {
      at::Tensor view = dense.slice(0, r0, r1).slice(1, c0, c1);
      if (dense.scalar_type() == at::kFloat) return view;
      return scratch.narrow(0, 0, h * w).view({h, w}).copy_(view);
    }
    at::Tensor out = scratch.narrow(0, 0, h * w).view({h, w});
    float* dst = out.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(w, 1));
    at::parallel_for(r0, r1, grain, [&](int64_t b, int64_t e) {
      cpu::decode_tile(codes, scales, zeros, bits, cols, groups, b, e, c0, c1, dst + (b - r0) * w, w);
    });
    return out;
  }
};

inline Projector dense_projector(const at::Tensor& p) {
  Projector proj;
  proj.dense = p;
  proj.rows = p.size(0);
  proj.cols = p.size(1);
  return proj;
}

// Validates a quantized projector (fastgrad/_ops.py::check_quantized_p): p_codes
// (rows, cols * bits / 8) uint8, p_scales/p_zeros (rows, groups) fp32, all contiguous.
inline Projector quantized_projector(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                                     const at::Tensor& zeros, int64_t bits) {
  FG_CHECK_ARG(bits == 4 || bits == 8, op, "bits", "4 or 8, got ", bits);
  check_2d(op, "p_codes", codes);
  Projector p;
  p.bits = static_cast<int>(bits);
  p.rows = codes.size(0);
  p.cols = check_quantized(op, "p_", codes, scales, zeros, bits, /*matrix=*/true);
  p.groups = scales.size(1);
  p.codes = codes.const_data_ptr<uint8_t>();
  p.scales = scales.const_data_ptr<float>();
  p.zeros = zeros.const_data_ptr<float>();
  return p;
}

// P's shape as the messages show it: a dense P's sizes, a quantized P's dense shape "(rows, cols)".
inline std::string shape_text(const Projector& p) {
  return p.dense.defined() ? c10::str(p.dense.sizes()) : c10::str("(", p.rows, ", ", p.cols, ")");
}

// The checks of a projection (fastgrad/_ops.py::check_project, check_project_back): the side, the
// float 2-d operand it projects (down: g (m, n); up: r, left (rank, n), right (m, rank)), and P on
// the operand's device (p_device), of its dtype if dense, with the dimension that meets the operand:
// down left (m, r), right (r, n); up left (m, rank), right (rank, n). Returns whether the side is "left".
inline bool check_projection(const char* op, bool up, const at::Tensor& t, c10::string_view side_sv,
                             const Projector& p, const at::Device& p_device) {
  const char* name = up ? "r" : "g";
  const bool left = check_side(op, std::string(side_sv));
  check_float_dtype(op, name, t.scalar_type());
  check_2d(op, name, t, up ? "" : " (m×n)");
  check_same_device(op, "p", p_device, name, t.device());
  if (p.dense.defined()) check_same_dtype(op, "p", p.dense.scalar_type(), name, t.scalar_type());
  const int64_t size = t.size(left ? 0 : 1);
  const char* other = up ? (left ? "m" : "n") : "r";  // P's other dimension, as the message names it
  const char* side = left ? "left" : "right";
  if (left != up) {  // P's rows meet the operand
    FG_CHECK_ARG(p.rows == size, op, "p", "of shape (", size, ", ", other, ") for side='", side, "' with ", name,
                 " of shape ", t.sizes(), ", got ", shape_text(p));
  } else {
    FG_CHECK_ARG(p.cols == size, op, "p", "of shape (", other, ", ", size, ") for side='", side, "' with ", name,
                 " of shape ", t.sizes(), ", got ", shape_text(p));
  }
  return left;
}

// Checks of the up projection with a dense P (see check_projection). Returns whether the side is "left".
inline bool check_back_dense(const char* op, const at::Tensor& r, const at::Tensor& p, c10::string_view side_sv) {
  check_2d(op, "p", p);
  return check_projection(op, /*up=*/true, r, side_sv, dense_projector(p), p.device());
}

// w, the in-place target of an _add_ op: a float tensor of shape (m, n) on r's device.
inline void check_accumulator(const char* op, const at::Tensor& w, const at::Tensor& r, int64_t m, int64_t n) {
  check_float_dtype(op, "w", w.scalar_type());
  FG_CHECK_ARG(w.dim() == 2 && w.size(0) == m && w.size(1) == n, op, "w", "of shape (", m, ", ", n, "), got ",
               w.sizes());
  check_same_device(op, "w", w.device(), "r", r.device());
}

// Checks of the up projection with a quantized P; returns whether the side is "left".
inline bool check_back_quantized(const char* op, const at::Tensor& r, const at::Tensor& p_codes, const Projector& p,
                                 c10::string_view side_sv) {
  return check_projection(op, /*up=*/true, r, side_sv, p, p_codes.device());
}

// Up projection into `out` (m, n), any float dtype, in place: out = beta * out + scale * (P R | R P),
// summed in fp32 and rounded once to out's dtype. beta = 0: out's previous contents are never read
// (a NaN there does not propagate); beta = 1: out += scale * up; other values: a weight decay.
// r: left (rank, n), right (m, rank); P: left (m, rank), right (rank, n).
inline void project_back_blocked(const at::Tensor& r, const Projector& p, bool left, double scale, at::Tensor& out,
                                 double beta) {
  const int64_t m = out.size(0), n = out.size(1);
  const int64_t rank = left ? r.size(0) : r.size(1);
  if (out.numel() == 0) return;
  if (rank == 0) {  // up = 0
    if (beta == 0.0) {
      out.zero_();
    } else if (beta != 1.0) {
      out.mul_(beta);
    }
    return;
  }
  const bool out_f32 = out.scalar_type() == at::kFloat;
  const auto f32 = r.options().dtype(at::kFloat);
  const at::Tensor rf = r.scalar_type() == at::kFloat ? r : r.to(at::kFloat);
  const int64_t split = left ? m : n;  // output rows (left) or columns (right), split into blocks
  const ScratchPlan plan = projection_scratch(split, rank, left ? n : m, p.numel(), !p.needs_scratch(), out_f32);
  const int64_t blk = plan.len;
  at::Tensor p_scratch = plan.p ? at::empty({plan.p}, f32) : at::Tensor();
  at::Tensor o_scratch = plan.other ? at::empty({plan.other}, f32) : at::Tensor();
  for (int64_t b0 = 0; b0 < split; b0 += blk) {
    const int64_t b1 = std::min(split, b0 + blk);
    at::Tensor dst = left ? out.slice(0, b0, b1) : out.slice(1, b0, b1);
    at::Tensor acc = out_f32 ? dst : o_scratch.narrow(0, 0, dst.numel()).view(dst.sizes());
    if (!out_f32 && beta != 0.0) acc.copy_(dst);
    if (left) {  // out[b0:b1, :] = beta * out[b0:b1, :] + scale * P[b0:b1, :] (blk, rank) @ R (rank, n)
      at::addmm_out(acc, acc, p.tile(b0, b1, 0, rank, p_scratch), rf, beta, /*alpha=*/scale);
    } else {  // out[:, b0:b1] = beta * out[:, b0:b1] + scale * R (m, rank) @ P[:, b0:b1] (rank, blk)
      at::addmm_out(acc, acc, rf, p.tile(0, rank, b0, b1, p_scratch), beta, /*alpha=*/scale);
    }
    if (!out_f32) dst.copy_(acc);
  }
}

}  // namespace cpu
}  // namespace fastgrad
