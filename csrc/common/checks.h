// Argument checks of the C++ kernels, CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) alike: the
// one FG_CHECK_ARG macro and the checks more than one kernel makes, each written once. Messages are
// worded like fastgrad/_ops.py (the Python checks of the fake and reference kernels), whose
// function names the helpers here carry; the tests compare the two.
//
// Host code, device-agnostic: a check that a tensor is on the kernel's device takes that device
// type as a parameter (the CUDA kernels pass at::kCUDA; the CPU kernels pass nothing: the
// dispatcher only routes CPU tensors to them).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

// The error of a bad argument, worded like fastgrad/_ops.py::_fail:
// "fastgrad.<op>: argument '<arg>' must be <expected>, got <got>".
#define FG_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK(cond, "fastgrad.", op, ": argument '", arg, "' must be ", __VA_ARGS__)

namespace fastgrad {

// A dtype as Python prints it ("torch.float16", where c10 prints "Half"), for the messages.
inline std::string py_dtype(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// The float dtypes every kernel takes for values (fastgrad/_ops.py::FLOAT_DTYPES).
inline bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

inline void check_float_dtype(const char* op, std::string_view arg, at::ScalarType t) {
  FG_CHECK_ARG(is_float_type(t), op, arg, "float32, bfloat16 or float16, got ", py_dtype(t));
}

inline void check_contiguous(const char* op, std::string_view arg, const at::Tensor& t) {
  FG_CHECK_ARG(t.is_contiguous(), op, arg, "contiguous, got a non-contiguous tensor");
}

// `dims` names the two dimensions in the message (" (m×n)"), or is empty.
inline void check_2d(const char* op, std::string_view arg, const at::Tensor& t, std::string_view dims = "") {
  FG_CHECK_ARG(t.dim() == 2, op, arg, "a 2-d tensor", dims, ", got a ", t.dim(), "-d tensor");
}

// `device` (of argument arg) is the device of argument ref_name (fastgrad/_ops.py::_check_same_device).
inline void check_same_device(const char* op, std::string_view arg, const at::Device& device,
                              std::string_view ref_name, const at::Device& ref) {
  FG_CHECK_ARG(device == ref, op, arg, "on ", ref_name, "'s device ", ref, ", got ", device);
}

// `dtype` (of argument arg) is the dtype of argument ref_name.
inline void check_same_dtype(const char* op, std::string_view arg, at::ScalarType dtype, std::string_view ref_name,
                             at::ScalarType ref) {
  FG_CHECK_ARG(dtype == ref, op, arg, "of ", ref_name, "'s dtype ", py_dtype(ref), ", got ", py_dtype(dtype));
}

// t is on a device of the kernel's type ("a CUDA tensor, got a tensor on cpu"); no check without one.
inline void check_device_type(const char* op, std::string_view arg, const at::Tensor& t,
                              std::optional<c10::DeviceType> type) {
  if (type) {
    FG_CHECK_ARG(t.device().type() == *type, op, arg, "a ", c10::DeviceTypeName(*type), " tensor, got a tensor on ",
                 t.device());
  }
}

// Returns whether the side is "left".
inline bool check_side(const char* op, const std::string& side) {
  FG_CHECK_ARG(side == "left" || side == "right", op, "side", "'left' or 'right', got '", side, "'");
  return side == "left";
}

// The Philox stream of stochastic rounding: seed in [0, 2**63), and stream positions offset + i for the
// numel elements that stay below 2**63 (no wrap-around into another element's position).
inline void check_seed_offset(const char* op, int64_t seed, int64_t offset, int64_t numel) {
  FG_CHECK_ARG(seed >= 0, op, "seed", "in [0, 2**63), got ", seed);
  FG_CHECK_ARG(offset >= 0, op, "offset", "non-negative, got ", offset);
  FG_CHECK_ARG(offset <= std::numeric_limits<int64_t>::max() - numel, op, "offset",
               "such that offset + numel < 2**63, got ", offset);
}

// quantize_int8/int4 (fastgrad/_ops.py::check_quantize): x (*, n) float32/bfloat16/float16,
// contiguous; group_size divides n (-1: one group per row), even for INT4 (two codes per byte);
// the Philox stream of x's elements. `device`: the kernel's device type. Returns the group size.
inline int64_t check_quantize(const char* op, int bits, const at::Tensor& x, int64_t group_size, int64_t seed,
                              int64_t offset, std::optional<c10::DeviceType> device = std::nullopt) {
  check_device_type(op, "x", x, device);
  check_float_dtype(op, "x", x.scalar_type());
  FG_CHECK_ARG(x.dim() >= 1, op, "x", "a tensor with at least 1 dimension, got a ", x.dim(), "-d tensor");
  check_contiguous(op, "x", x);
  const int64_t n = x.size(-1);
  FG_CHECK_ARG(group_size == -1 || group_size > 0, op, "group_size", "positive or -1 (one group per row), got ",
               group_size);
  const int64_t g = group_size == -1 ? n : group_size;
  FG_CHECK_ARG(g > 0 && n % g == 0, op, "group_size", "a divisor of the last dimension ", n, ", got ", group_size);
  if (bits == 4) FG_CHECK_ARG(g % 2 == 0, op, "group_size", "even for INT4 (two codes per byte), got ", g);
  check_seed_offset(op, seed, offset, x.numel());
  return g;
}

// Quantized storage, the input of dequantize and a quantized P or W (the storage checks of
// fastgrad/_ops.py::check_dequantize): codes (*, n * bits / 8) uint8, scales and zeros (*, groups)
// fp32, all contiguous, on codes's device; groups divide n, and are even for INT4. `prefix` names
// the arguments ("p_": p_codes, p_scales, p_zeros). `matrix`: the caller checked that codes is
// 2-d, and the expected shape of scales reads (rows, groups). Returns n, the values per row.
inline int64_t check_quantized(const char* op, const char* prefix, const at::Tensor& codes, const at::Tensor& scales,
                               const at::Tensor& zeros, int64_t bits, bool matrix = false) {
  const std::string c = std::string(prefix) + "codes", s = std::string(prefix) + "scales",
                    z = std::string(prefix) + "zeros";
  FG_CHECK_ARG(codes.scalar_type() == at::kByte, op, c, "uint8, got ", py_dtype(codes.scalar_type()));
  FG_CHECK_ARG(codes.dim() >= 1, op, c, "a tensor with at least 1 dimension, got a ", codes.dim(), "-d tensor");
  check_contiguous(op, c, codes);
  const std::initializer_list<std::pair<const std::string&, const at::Tensor&>> params{{s, scales}, {z, zeros}};
  for (const auto& [name, t] : params) {
    FG_CHECK_ARG(t.scalar_type() == at::kFloat, op, name, "float32, got ", py_dtype(t.scalar_type()));
    check_contiguous(op, name, t);
  }
  for (const auto& [name, t] : params) check_same_device(op, name, t.device(), c, codes.device());
  if (matrix) {
    FG_CHECK_ARG(scales.dim() == 2 && scales.size(0) == codes.size(0), op, s, "of shape (", codes.size(0),
                 ", groups), got ", scales.sizes());
  } else {
    const auto lead = codes.sizes().slice(0, codes.dim() - 1);
    FG_CHECK_ARG(scales.dim() == codes.dim() && scales.sizes().slice(0, scales.dim() - 1) == lead, op, s,
                 "of shape (*", lead, ", groups), got ", scales.sizes());
  }
  FG_CHECK_ARG(zeros.sizes() == scales.sizes(), op, z, "of shape ", scales.sizes(), ", got ", zeros.sizes());
  const int64_t n = codes.size(-1) * (8 / bits);
  const int64_t groups = scales.size(-1);
  FG_CHECK_ARG(groups > 0 && n % groups == 0, op, s, "with a last dimension that divides ", n, ", got ", groups);
  if (bits == 4) {
    FG_CHECK_ARG((n / groups) % 2 == 0, op, s, "such that groups are even (", n, " values per row), got ", groups);
  }
  return n;
}

// dequantize_int8/int4 (fastgrad/_ops.py::check_dequantize): the storage (check_quantized) and a
// float output dtype. `device`: the kernel's device type. Returns n, the values per row.
inline int64_t check_dequantize(const char* op, int bits, const at::Tensor& codes, const at::Tensor& scales,
                                const at::Tensor& zeros, at::ScalarType dtype,
                                std::optional<c10::DeviceType> device = std::nullopt) {
  check_device_type(op, "codes", codes, device);
  const int64_t n = check_quantized(op, "", codes, scales, zeros, bits);
  check_float_dtype(op, "dtype", dtype);
  return n;
}

// round_bf16_stochastic (fastgrad/_ops.py::check_round_bf16): x float32, contiguous; the Philox
// stream of x's elements. `device`: the kernel's device type.
inline void check_round_bf16(const char* op, const at::Tensor& x, int64_t seed, int64_t offset,
                             std::optional<c10::DeviceType> device = std::nullopt) {
  check_device_type(op, "x", x, device);
  FG_CHECK_ARG(x.scalar_type() == at::kFloat, op, "x", "float32, got ", py_dtype(x.scalar_type()));
  check_contiguous(op, "x", x);
  check_seed_offset(op, seed, offset, x.numel());
}

}  // namespace fastgrad
