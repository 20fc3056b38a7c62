// Group-wise INT8/INT4 quantization and dequantization on CPU.
// Math: fastgrad/_reference.py::quantize / dequantize / pack_int4 / unpack_int4; the codes, scales
// and zeros are bitwise identical to the reference for every dtype, group size and (seed, offset).
//
//   asymmetric: scale = (max - min) / qmax,   zero = min
//   symmetric:  scale = absmax / (qmax / 2),  zero = -2**(bits-1) * scale
//   scale <= 0 or NaN -> 1;  u = (x - zero) / scale  (correctly rounded fp32 division)
//   RTN: floor(u + 0.5);  SR: floor(u) + (xi < u - floor(u)),  xi = Philox uniform of offset + i
//   code = clamp(., 0, qmax) (NaN -> 0, as torch's float -> uint8 conversion gives)
//
// Work split: at::parallel_for over groups (a group is g consecutive elements of the flat
// tensor, since g divides the last dimension). Within a group, elements go through fixed-size
// chunks: one pass for min/max, one to encode. Philox words come from a per-thread buffer refilled
// kChunk counters at a time (16 lanes at once, AVX2); every element's counter is absolute
// (offset + flat index), so nothing depends on how groups are split among threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../common/checks.h"
#include "../common/philox.h"
#include "quant_common.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastgrad {
namespace {

using cpu::kChunk;

// out[i] = uniform in [0, 1) of counter first + i, i < kChunk (== fastgrad::philox_uniform).
// Philox dominates stochastic rounding, so it runs on 16 counters at once. With AVX2: explicit
// intrinsics (32x32->64 products with vpmuludq on the even and odd lanes, then blends), about 2x
// faster than what gcc makes of the portable loop, which is kept for other targets: there the
// rounds run on local lane arrays with the high half written as a widening multiply, a form gcc
// vectorizes. Both produce exactly the words of philox_uint32.
#if defined(__AVX2__)
inline void mul_hi_lo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0,2,4,6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

void philox_uniforms(uint64_t seed, uint64_t first, float* __restrict out) {
  constexpr int V = 2;  // independent 8-lane vectors per step, for instruction-level parallelism
  static_assert(kChunk % (8 * V) == 0, "kChunk must be a multiple of 16");
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256 to_unit = _mm256_set1_ps(1.0f / 16777216.0f);
  for (int64_t b = 0; b < kChunk; b += 8 * V) {
    __m256i c0[V], c1[V], c2[V], c3[V];
    for (int v = 0; v < V; ++v) {
      const uint64_t ctr = first + static_cast<uint64_t>(b + 8 * v);
      const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr)));
      c0[v] = _mm256_add_epi32(lo, lane);
      // Carry into the high word where the low word wrapped (unsigned c0 < lo): adds 1 as -(-1).
      const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0[v], sign));
      c1[v] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr >> 32))), wrapped);
      c2[v] = _mm256_setzero_si256();
      c3[v] = _mm256_setzero_si256();
    }
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < V; ++v) {
        __m256i hi0, lo0, hi1, lo1;
        mul_hi_lo(c0[v], m0, hi0, lo0);
        mul_hi_lo(c2[v], m1, hi1, lo1);
        const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), key0);
        const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), key1);
        c1[v] = lo1;
        c3[v] = lo0;
        c0[v] = n0;
        c2[v] = n2;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int v = 0; v < V; ++v) {
      // (word >> 8) < 2**24: exact in int32 and in fp32.
      const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c0[v], 8)), to_unit);
      _mm256_storeu_ps(out + b + 8 * v, u);
    }
  }
}
#else
void philox_uniforms(uint64_t seed, uint64_t first, float* __restrict out) {
  constexpr int L = 16;
  static_assert(kChunk % L == 0, "kChunk must be a multiple of the Philox lane count");
  for (int64_t b = 0; b < kChunk; b += L) {
    uint32_t c0[L], c1[L], c2[L], c3[L];
    for (int l = 0; l < L; ++l) {
      const uint64_t ctr = first + static_cast<uint64_t>(b + l);
      c0[l] = static_cast<uint32_t>(ctr);
      c1[l] = static_cast<uint32_t>(ctr >> 32);
      c2[l] = 0;
      c3[l] = 0;
    }
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < L; ++l) {
        const uint32_t hi0 = static_cast<uint32_t>((static_cast<uint64_t>(kPhiloxM0) * c0[l]) >> 32);
        const uint32_t hi1 = static_cast<uint32_t>((static_cast<uint64_t>(kPhiloxM1) * c2[l]) >> 32);
        const uint32_t lo0 = kPhiloxM0 * c0[l];
        const uint32_t lo1 = kPhiloxM1 * c2[l];
        c0[l] = hi1 ^ c1[l] ^ k0;
        c2[l] = hi0 ^ c3[l] ^ k1;
        c1[l] = lo1;
        c3[l] = lo0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int l = 0; l < L; ++l) {
      out[b + l] = static_cast<float>(static_cast<int32_t>(c0[l] >> 8)) * (1.0f / 16777216.0f);
    }
  }
}
#endif

// scale and zero of one group x: (g,) (see the file comment). buf: kChunk fp32 scratch.
template <typename scalar_t>
void group_params(const scalar_t* x, int64_t g, int bits, bool symmetric, float* __restrict buf, float* scale_out,
                  float* zero_out) {
  constexpr int L = 8;
  const float inf = std::numeric_limits<float>::infinity();
  float lo[L], hi[L];
  int32_t nan[L];
  for (int l = 0; l < L; ++l) {
    lo[l] = inf;
    hi[l] = symmetric ? 0.0f : -inf;
    nan[l] = 0;
  }
  for (int64_t s = 0; s < g; s += kChunk) {
    const int64_t k = std::min(kChunk, g - s);
    const float* v;
    if constexpr (std::is_same_v<scalar_t, float>) {
      v = x + s;
    } else {
      cpu::load_f32(x + s, k, buf);
      v = buf;
    }
    const int64_t kv = k - k % L;
    if (symmetric) {
      for (int64_t i = 0; i < kv; i += L) {
        for (int l = 0; l < L; ++l) {
          const float a = std::fabs(v[i + l]);
          hi[l] = a > hi[l] ? a : hi[l];
          nan[l] |= static_cast<int32_t>(v[i + l] != v[i + l]);
        }
      }
      for (int64_t i = kv; i < k; ++i) {
        const float a = std::fabs(v[i]);
        hi[0] = a > hi[0] ? a : hi[0];
        nan[0] |= static_cast<int32_t>(v[i] != v[i]);
      }
    } else {
      for (int64_t i = 0; i < kv; i += L) {
        for (int l = 0; l < L; ++l) {
          const float a = v[i + l];
          lo[l] = a < lo[l] ? a : lo[l];
          hi[l] = a > hi[l] ? a : hi[l];
          nan[l] |= static_cast<int32_t>(a != a);
        }
      }
      for (int64_t i = kv; i < k; ++i) {
        const float a = v[i];
        lo[0] = a < lo[0] ? a : lo[0];
        hi[0] = a > hi[0] ? a : hi[0];
        nan[0] |= static_cast<int32_t>(a != a);
      }
    }
  }
  float mn = lo[0], mx = hi[0];
  int32_t any_nan = nan[0];
  for (int l = 1; l < L; ++l) {
    mn = lo[l] < mn ? lo[l] : mn;
    mx = hi[l] > mx ? hi[l] : mx;
    any_nan |= nan[l];
  }
  if (any_nan) {  // torch's amin/amax propagate NaN
    mn = std::numeric_limits<float>::quiet_NaN();
    mx = mn;
  }
  const int qmax = (1 << bits) - 1;
  float scale, zero;
  if (symmetric) {
    scale = mx / static_cast<float>(qmax / 2);
    scale = scale > 0.0f ? scale : 1.0f;
    zero = scale * static_cast<float>(-(1 << (bits - 1)));
  } else {
    scale = (mx - mn) / static_cast<float>(qmax);
    scale = scale > 0.0f ? scale : 1.0f;
    zero = mn;
  }
  *scale_out = scale;
  *zero_out = zero;
}

// codes[i] for x: (k,) fp32 in one group; xi: (k,) uniforms (stochastic only).
template <bool kStochastic>
void encode(const float* __restrict x, const float* __restrict xi, int64_t k, float scale, float zero, float qmax,
            uint8_t* __restrict codes) {
  for (int64_t i = 0; i < k; ++i) {
    const float u = (x[i] - zero) / scale;
    float c;
    if constexpr (kStochastic) {
      const float fl = std::floor(u);
      c = fl + (xi[i] < (u - fl) ? 1.0f : 0.0f);
    } else {
      c = std::floor(u + 0.5f);
    }
    c = c > 0.0f ? c : 0.0f;  // also NaN -> 0
    c = c < qmax ? c : qmax;
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(c));
  }
}

// x: (numel,) contiguous, numel = groups * g -> codes: (numel * bits / 8,) uint8 (INT4 packed),
// scales, zeros: (groups,) fp32.
template <typename scalar_t>
void quantize_kernel(const scalar_t* x, int64_t numel, int64_t g, int bits, bool symmetric, bool stochastic,
                     uint64_t seed, uint64_t offset, uint8_t* codes, float* scales, float* zeros) {
  const int64_t groups = numel / g;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / g);
  at::parallel_for(0, groups, grain, [&](int64_t gb, int64_t ge) {
    alignas(64) float xbuf[kChunk];
    alignas(64) float xi[kChunk];
    alignas(64) uint8_t cbuf[kChunk];
    int64_t xi_begin = 0, xi_end = 0;  // flat element range whose uniforms are in xi
    for (int64_t grp = gb; grp < ge; ++grp) {
      const int64_t base = grp * g;
      float scale, zero;
      group_params(x + base, g, bits, symmetric, xbuf, &scale, &zero);
      scales[grp] = scale;
      zeros[grp] = zero;
      for (int64_t s = 0; s < g;) {
        const int64_t e0 = base + s;
        int64_t k = std::min(kChunk, g - s);
        if (stochastic) {
          if (e0 >= xi_end) {
            philox_uniforms(seed, offset + static_cast<uint64_t>(e0), xi);
            xi_begin = e0;
            xi_end = e0 + kChunk;
          }
          k = std::min(k, xi_end - e0);
        }
        const float* v;
        if constexpr (std::is_same_v<scalar_t, float>) {
          v = x + e0;
        } else {
          cpu::load_f32(x + e0, k, xbuf);
          v = xbuf;
        }
        // INT4: groups are even and chunks/refills start at even elements, so k and e0 are even.
        uint8_t* dst = bits == 8 ? codes + e0 : cbuf;
        if (stochastic) {
          encode<true>(v, xi + (e0 - xi_begin), k, scale, zero, qmax, dst);
        } else {
          encode<false>(v, nullptr, k, scale, zero, qmax, dst);
        }
        if (bits == 4) {
          uint8_t* packed = codes + e0 / 2;
          for (int64_t j = 0; j < k / 2; ++j) packed[j] = static_cast<uint8_t>(cbuf[2 * j] | (cbuf[2 * j + 1] << 4));
        }
        s += k;
      }
    }
  });
}

// x: (*, n) float32/bfloat16/float16, contiguous -> codes (*, n * bits / 8) uint8,
// scales (*, n / g) fp32, zeros (*, n / g) fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const char* op, int bits, const at::Tensor& x,
                                                            int64_t group_size, bool symmetric, bool stochastic,
                                                            int64_t seed, int64_t offset) {
  const int64_t g = check_quantize(op, bits, x, group_size, seed, offset);
  const auto dt = x.scalar_type();
  const int64_t n = x.size(-1);
  const int64_t numel = x.numel();

  auto code_shape = x.sizes().vec();
  code_shape.back() = n * bits / 8;
  auto group_shape = x.sizes().vec();
  group_shape.back() = n / g;
  at::Tensor codes = at::empty(code_shape, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(group_shape, x.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty(group_shape, x.options().dtype(at::kFloat));
  if (numel == 0) return {codes, scales, zeros};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "fastgrad_quantize_cpu", [&] {
    quantize_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), numel, g, bits, symmetric, stochastic,
                              static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), codes.data_ptr<uint8_t>(),
                              scales.data_ptr<float>(), zeros.data_ptr<float>());
  });
  return {codes, scales, zeros};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x, int64_t group_size,
                                                                 bool symmetric, bool stochastic, int64_t seed,
                                                                 int64_t offset) {
  return quantize_cpu("quantize_int8", 8, x, group_size, symmetric, stochastic, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_cpu(const at::Tensor& x, int64_t group_size,
                                                                 bool symmetric, bool stochastic, int64_t seed,
                                                                 int64_t offset) {
  return quantize_cpu("quantize_int4", 4, x, group_size, symmetric, stochastic, seed, offset);
}

// codes: (rows, n * bits / 8) uint8, scales/zeros: (rows, groups) fp32 -> out: (rows, n) out_t.
template <typename out_t>
void dequantize_kernel(const uint8_t* codes, const float* scales, const float* zeros, int bits, int64_t rows, int64_t n,
                       int64_t groups, out_t* out) {
  const int64_t g = n / groups;
  const int64_t row_bytes = bits == 8 ? n : n / 2;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / g);
  at::parallel_for(0, rows * groups, grain, [&](int64_t tb, int64_t te) {
    alignas(64) float buf[kChunk];
    for (int64_t t = tb; t < te; ++t) {
      const int64_t r = t / groups;
      const int64_t c_begin = (t % groups) * g;
      const uint8_t* row = codes + r * row_bytes;
      out_t* dst = out + r * n;
      for (int64_t c = c_begin; c < c_begin + g; c += kChunk) {
        const int64_t c_end = std::min(c + kChunk, c_begin + g);
        if constexpr (std::is_same_v<out_t, float>) {
          cpu::decode_segment(row, bits, c, c_end, scales[t], zeros[t], dst + c);
        } else {
          cpu::decode_segment(row, bits, c, c_end, scales[t], zeros[t], buf);
          cpu::store_f32(buf, c_end - c, dst + c);
        }
      }
    }
  });
}

// codes: (*, n * bits / 8) uint8, scales/zeros: (*, groups) fp32 -> (*, n) of `dtype`.
at::Tensor dequantize_cpu(const char* op, int bits, const at::Tensor& codes, const at::Tensor& scales,
                          const at::Tensor& zeros, at::ScalarType dtype) {
  const int64_t n = check_dequantize(op, bits, codes, scales, zeros, dtype);
  const int64_t groups = scales.size(-1);

  auto out_shape = codes.sizes().vec();
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, codes.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fastgrad_dequantize_cpu", [&] {
    dequantize_kernel<scalar_t>(codes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                                zeros.const_data_ptr<float>(), bits, rows, n, groups, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor dequantize_int8_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                               at::ScalarType dtype) {
  return dequantize_cpu("dequantize_int8", 8, codes, scales, zeros, dtype);
}

at::Tensor dequantize_int4_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                               at::ScalarType dtype) {
  return dequantize_cpu("dequantize_int4", 4, codes, scales, zeros, dtype);
}

}  // namespace

void cpu::quantize_f32(const float* x, int64_t numel, int64_t g, int bits, bool symmetric, bool stochastic,
                       uint64_t seed, uint64_t offset, uint8_t* codes, float* scales, float* zeros) {
  quantize_kernel<float>(x, numel, g, bits, symmetric, stochastic, seed, offset, codes, scales, zeros);
}

TORCH_LIBRARY_IMPL(fastgrad, CPU, m) {
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
  m.impl("quantize_int4", &quantize_int4_cpu);
  m.impl("dequantize_int4", &dequantize_int4_cpu);
}

}  // namespace fastgrad
