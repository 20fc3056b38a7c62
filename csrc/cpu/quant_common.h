// Helpers shared by the CPU quantizer kernels (quant.cpp), the fused quantized-projector kernels
// (project.cpp) and the fused Adam steps (adam_step.cpp): fp32 <-> bf16/fp16 conversion, the
// group-wise affine decode x = code * scale + zero of fastgrad/_reference.py::dequantize, and the
// entry point of the one CPU quantizer (quant.cpp). The argument checks: csrc/common/checks.h.
//
// The loops are written for gcc's auto-vectorizer (-O3 -mavx2 -fno-trapping-math, see setup.py):
// __restrict pointers, no calls, selects instead of branches. -ffp-contract=off keeps code * scale
// and + zero two correctly rounded fp32 operations, exactly as the reference computes them.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/quant_math.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastgrad {
namespace cpu {

// Elements processed per inner step: small enough for fp32 scratch arrays on the stack.
constexpr int64_t kChunk = 256;

// src: (k,) float/bf16/fp16 -> dst: (k,) fp32, exact (both narrow formats embed in fp32).
template <typename scalar_t>
inline void load_f32(const scalar_t* __restrict src, int64_t k, float* __restrict dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, sizeof(float) * k);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for (int64_t i = 0; i < k; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
  } else {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= k; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < k; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// src: (k,) fp32 -> dst: (k,) float/bf16/fp16, round-to-nearest-even exactly like torch's `.to()`
// (including its vectorized NaN encodings: bf16 NaN -> 0xFFFF, qmath::float_to_bf16_rne; fp16
// NaN via F16C).
template <typename scalar_t>
inline void store_f32(const float* __restrict src, int64_t k, scalar_t* __restrict dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, sizeof(float) * k);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < k; ++i) d[i] = qmath::float_to_bf16_rne(src[i]);
  } else {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= k; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
#endif
    for (; i < k; ++i) dst[i] = static_cast<c10::Half>(src[i]);
  }
}

// Decode elements [c0, c1) of one row of codes into dst[0 .. c1-c0), all in one group
// (scale, zero). row: the row's codes, (n,) uint8 for bits=8 or (n/2,) packed for bits=4 (element
// 2j in the low nibble of byte j, 2j+1 in the high nibble). The contract makes INT4 groups even and
// the callers split rows at even columns, so c0 is even for bits=4; an odd c0 would still decode.
inline void decode_segment(const uint8_t* __restrict row, int bits, int64_t c0, int64_t c1, float scale, float zero,
                           float* __restrict dst) {
  if (bits == 8) {
    const uint8_t* s = row + c0;
    const int64_t k = c1 - c0;
    for (int64_t i = 0; i < k; ++i) dst[i] = qmath::decode(s[i], scale, zero);
    return;
  }
  if (c0 & 1) {  // leading high nibble
    *dst++ = qmath::decode(row[c0 >> 1] >> 4, scale, zero);
    ++c0;
  }
  if (c0 >= c1) return;
  const uint8_t* s = row + (c0 >> 1);
  const int64_t pairs = (c1 - c0) >> 1;
  for (int64_t j = 0; j < pairs; ++j) {
    const uint8_t b = s[j];
    dst[2 * j] = qmath::decode(b & 0x0F, scale, zero);
    dst[2 * j + 1] = qmath::decode(b >> 4, scale, zero);
  }
  if ((c1 - c0) & 1) dst[2 * pairs] = qmath::decode(s[pairs] & 0x0F, scale, zero);  // trailing low nibble
}

// Decode the tile rows [r0, r1) x columns [c0, c1) of a quantized matrix with `cols` values per
// row, into dst (row-major, leading dimension ldd) in fp32. Single-threaded; callers parallelize.
//   codes: (rows, cols) uint8 for bits=8, (rows, cols/2) for bits=4
//   scales, zeros: (rows, groups) fp32; group size cols / groups along each row
inline void decode_tile(const uint8_t* codes, const float* scales, const float* zeros, int bits, int64_t cols,
                        int64_t groups, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* dst, int64_t ldd) {
  const int64_t g = cols / groups;
  const int64_t row_bytes = bits == 8 ? cols : cols / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = codes + r * row_bytes;
    const float* sc = scales + r * groups;
    const float* ze = zeros + r * groups;
    float* d = dst + (r - r0) * ldd;
    for (int64_t c = c0; c < c1;) {
      const int64_t grp = c / g;
      const int64_t end = std::min(c1, (grp + 1) * g);
      decode_segment(row, bits, c, end, sc[grp], ze[grp], d + (c - c0));
      c = end;
    }
  }
}

// Group-wise quantization of fp32 values (defined in quant.cpp, the quantize_int8/int4 kernels):
// x: (numel,) contiguous, numel = groups * g -> codes: (numel * bits / 8,) uint8 (INT4 packed),
// scales, zeros: (groups,) fp32; stochastic rounding uses the Philox counter offset + i for x[i].
// Bitwise fastgrad/_reference.py::quantize. Parallel over groups (at::parallel_for).
void quantize_f32(const float* x, int64_t numel, int64_t g, int bits, bool symmetric, bool stochastic, uint64_t seed,
                  uint64_t offset, uint8_t* codes, float* scales, float* zeros);

}  // namespace cpu
}  // namespace fastgrad
