// Per-element math of the quantizers, of fp32 -> bf16 rounding (to nearest even, and stochastic),
// shared by the CPU kernels (csrc/cpu/quant_common.h, quant.cpp, round_bf16.cpp), the CUDA kernels
// (csrc/cuda/quant.cu) and the host harness of tests/test_cuda_math.py, which runs these very
// functions on the CPU (g++) against fastgrad/_reference.py. Everything here is FASTGRAD_HD
// (host + device) and needs no torch/CUDA header.
//
// Math (fastgrad/_reference.py, module docstring), bits b in {4, 8}, qmax = 2**b - 1:
//   asymmetric: scale = (max - min) / qmax,        zero = min
//   symmetric:  scale = absmax / (qmax // 2),      zero = -2**(b-1) * scale
//   scale <= 0 or NaN -> 1;   u = (x - zero) / scale   (correctly rounded fp32 division)
//   RTN: floor(u + 0.5);  SR: floor(u) + (xi < u - floor(u)),  xi = philox_uniform(seed, offset + i)
//   code = clamp(., 0, qmax), NaN -> 0 (as the CPU kernels and torch's float -> uint8 give)
//   decode: code * scale + zero, two correctly rounded fp32 operations (never one FMA)
//
// Bitwise identity with the reference needs IEEE fp32 operations with no contraction and no
// flush-to-zero: on the device the arithmetic goes through the __f*_rn intrinsics (never
// contracted, IEEE division even under --use_fast_math; setup.py also builds with -fmad=false
// and without --use_fast_math, so no flush-to-zero); on the host, plain operators compiled with
// -ffp-contract=off.
#pragma once
#include <cstdint>
#include <cstring>

#include "philox.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace fastgrad {
namespace qmath {

// ---- correctly rounded fp32 arithmetic, never contracted --------------------------------------
FASTGRAD_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FASTGRAD_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FASTGRAD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTGRAD_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FASTGRAD_HD float floor_f(float a) {
#if defined(__CUDA_ARCH__)
  return floorf(a);
#else
  return std::floor(a);
#endif
}

// ---- bit casts ----------------------------------------------------------------------------------
FASTGRAD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
FASTGRAD_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// bf16 bits -> fp32 (exact).
FASTGRAD_HD float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// fp32 -> bf16 bits, round to nearest even; NaN -> 0xFFFF, as torch's vectorized CPU conversion
// (the reference) writes it, and as the Triton kernels do (kernels/_common.py::f32_to_bf16_bits).
FASTGRAD_HD uint16_t float_to_bf16_rne(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFu;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// ---- group statistics ---------------------------------------------------------------------------
// NaN-propagating min/max (torch's amin/amax propagate NaN): once a NaN is folded in, it stays.
// Exact (no rounding), so the reduction order changes nothing but the sign of a zero.
FASTGRAD_HD float nan_min(float acc, float v) { return (v < acc || v != v) ? v : acc; }
FASTGRAD_HD float nan_max(float acc, float v) { return (v > acc || v != v) ? v : acc; }

// Running statistics of a group: asymmetric (lo, hi) = (min, max); symmetric hi = absmax, lo unused.
struct Stats {
  float lo, hi;
};

FASTGRAD_HD Stats stats_init(bool symmetric) {
  // +-inf as bit patterns: no <limits> or INFINITY needed on either side.
  return Stats{bits_float(0x7F800000u), symmetric ? 0.0f : bits_float(0xFF800000u)};
}

FASTGRAD_HD void stats_add(Stats& s, float v, bool symmetric) {
  if (symmetric) {
    s.hi = nan_max(s.hi, bits_float(float_bits(v) & 0x7FFFFFFFu));  // |v|, NaN stays NaN
  } else {
    s.lo = nan_min(s.lo, v);
    s.hi = nan_max(s.hi, v);
  }
}

FASTGRAD_HD void stats_merge(Stats& s, const Stats& o) {
  s.lo = nan_min(s.lo, o.lo);
  s.hi = nan_max(s.hi, o.hi);
}

// (scale, zero) of a group from its statistics (see the file comment).
struct Affine {
  float scale, zero;
};

FASTGRAD_HD Affine group_affine(const Stats& s, int bits, bool symmetric) {
  const int qmax = (1 << bits) - 1;
  Affine a;
  if (symmetric) {
    a.scale = div_rn(s.hi, static_cast<float>(qmax / 2));
    a.scale = a.scale > 0.0f ? a.scale : 1.0f;                       // also NaN -> 1
    a.zero = mul_rn(a.scale, static_cast<float>(-(1 << (bits - 1))));  // times a power of two: exact
  } else {
    a.scale = div_rn(sub_rn(s.hi, s.lo), static_cast<float>(qmax));
    a.scale = a.scale > 0.0f ? a.scale : 1.0f;
    a.zero = s.lo;
  }
  return a;
}

// ---- encode / decode ------------------------------------------------------------------------------
// One code in [0, qmax]. xi: the element's uniform (read only when stochastic).
FASTGRAD_HD uint32_t encode(float x, Affine a, float qmax, bool stochastic, float xi) {
  const float u = div_rn(sub_rn(x, a.zero), a.scale);
  float c;
  if (stochastic) {
    const float fl = floor_f(u);
    c = add_rn(fl, xi < sub_rn(u, fl) ? 1.0f : 0.0f);
  } else {
    c = floor_f(add_rn(u, 0.5f));
  }
  c = c > 0.0f ? c : 0.0f;  // also NaN -> 0
  c = c < qmax ? c : qmax;
  return static_cast<uint32_t>(static_cast<int32_t>(c));
}

// Two INT4 codes -> one byte: element 2j in the low nibble, element 2j+1 in the high nibble.
FASTGRAD_HD uint32_t pack_nibbles(uint32_t even, uint32_t odd) { return even | (odd << 4); }

FASTGRAD_HD float decode(uint32_t code, float scale, float zero) {
  return add_rn(mul_rn(static_cast<float>(code), scale), zero);
}

// ---- fp32 -> bf16 stochastic rounding -------------------------------------------------------------
// Adds the top 16 bits of the element's Philox word to the fp32 bit pattern and truncates: the
// magnitude rounds up with probability equal to the discarded fraction (no wrap: a non-NaN
// pattern plus < 2**16 stays below 2**32). NaN keeps its sign and becomes quiet (truncating a
// payload held in the low 16 bits alone would turn it into an infinity).
FASTGRAD_HD uint16_t round_bf16_sr(float x, uint32_t word) {
  const uint32_t b = float_bits(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x0040u);
  return static_cast<uint16_t>((b + (word >> 16)) >> 16);
}

}  // namespace qmath
}  // namespace fastgrad
