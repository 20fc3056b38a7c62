// Group-wise INT8/INT4 quantization and dequantization on CPU.
// Math: fastgrad/_reference.py::quantize / dequantize / pack_int4 / unpack_int4; the codes, scales
// and zeros are bitwise identical to the reference for every dtype, group size and (seed, offset).
//
//   asymmetric: scale = (max - min) / qmax,   zero = min
//   symmetric:  scale = absmax / (qmax / 2),  zero = -2**(bits-1) * scale
//   scale <= 0 or NaN -> 1;  u = (x - zero) / scale  (correctly rounded fp32 division)
//   RTN: floor(u + 0.5);  SR: floor(u) + (xi < u - floor(u)),  xi = uniform of stream position offset + i
//   code = clamp(., 0, qmax) (NaN -> 0, as torch's float -> uint8 conversion gives)
//
// Work split: at::parallel_for over groups (a group is g consecutive elements of the flat
// tensor, since g divides the last dimension). Within a group, elements go through fixed-size
// chunks: one pass for min/max, one to encode. Philox words come from a per-thread window of the
// stream (philox_cpu.h: four words per evaluation, 16 counters at once); every element's stream
// position is absolute (offset + flat index), so nothing depends on how groups are split among threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../common/checks.h"
#include "philox_cpu.h"
#include "quant_common.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastgrad {
namespace {

using cpu::kChunk;

// Lane l of lo/hi/nan takes elements l, l + 8, ... of v: (kv,), kv % 8 == 0. Running minimum
// `a < lo ? a : lo` and maximum `a > hi ? a : hi` (symmetric: of |a|; lo is then unused), and
// whether a NaN was seen. The lane split fixes which of -0/+0 wins a tie, the same on every path.
inline void minmax_lanes(const float* __restrict v, int64_t kv, bool symmetric, float lo[8], float hi[8],
                         int32_t nan[8]) {
#if defined(__AVX2__)
  // min_ps(a, lo) is exactly `a < lo ? a : lo` (and max_ps likewise): the same selects, 8 at once.
  __m256 vlo = _mm256_loadu_ps(lo), vhi = _mm256_loadu_ps(hi);
  __m256 vnan = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < kv; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    if (symmetric) {
      vhi = _mm256_max_ps(_mm256_and_ps(x, abs_mask), vhi);
    } else {
      vlo = _mm256_min_ps(x, vlo);
      vhi = _mm256_max_ps(x, vhi);
    }
  }
  _mm256_storeu_ps(lo, vlo);
  _mm256_storeu_ps(hi, vhi);
  nan[0] |= static_cast<int32_t>(_mm256_movemask_ps(vnan) != 0);
#else
  for (int64_t i = 0; i < kv; i += 8) {
    for (int l = 0; l < 8; ++l) {
      const float a = symmetric ? std::fabs(v[i + l]) : v[i + l];
      lo[l] = a < lo[l] ? a : lo[l];
      hi[l] = a > hi[l] ? a : hi[l];
      nan[l] |= static_cast<int32_t>(a != a);
    }
  }
#endif
}

// x: (k,) as fp32: x itself, or its conversion into buf (kChunk fp32 scratch, k <= kChunk).
template <typename scalar_t>
inline const float* as_f32(const scalar_t* x, int64_t k, float* __restrict buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    cpu::load_f32(x, k, buf);
    return buf;
  }
}

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
    const float* v = as_f32(x + s, k, buf);
    const int64_t kv = k - k % L;
    minmax_lanes(v, kv, symmetric, lo, hi, nan);
    for (int64_t i = kv; i < k; ++i) {  // the tail goes to lane 0
      const float a = symmetric ? std::fabs(v[i]) : v[i];
      lo[0] = a < lo[0] ? a : lo[0];
      hi[0] = a > hi[0] ? a : hi[0];
      nan[0] |= static_cast<int32_t>(a != a);
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
  const qmath::Affine a = qmath::group_affine(qmath::Stats{mn, mx}, bits, symmetric);
  *scale_out = a.scale;
  *zero_out = a.zero;
}

// codes[i] for x: (k,) fp32 in one group; words: (k,) the elements' Philox words (stochastic only).
template <bool kStochastic>
void encode(const float* __restrict x, const uint32_t* __restrict words, int64_t k, float scale, float zero,
            float qmax, uint8_t* __restrict codes) {
  const qmath::Affine a{scale, zero};
  for (int64_t i = 0; i < k; ++i) {
    // word_to_uniform, written so gcc vectorizes it: word >> 8 < 2**24 is exact in int32 and fp32.
    const float xi = kStochastic ? static_cast<float>(static_cast<int32_t>(words[i] >> 8)) * (1.0f / 16777216.0f) : 0.0f;
    codes[i] = static_cast<uint8_t>(qmath::encode(x[i], a, qmax, kStochastic, xi));
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
    alignas(64) uint8_t cbuf[kChunk];
    cpu::PhiloxWindow<kChunk> stream;
    for (int64_t grp = gb; grp < ge; ++grp) {
      const int64_t base = grp * g;
      float scale, zero;
      group_params(x + base, g, bits, symmetric, xbuf, &scale, &zero);
      scales[grp] = scale;
      zeros[grp] = zero;
      for (int64_t s = 0; s < g;) {
        const int64_t e0 = base + s;
        const int64_t k = std::min(kChunk, g - s);
        const float* v = as_f32(x + e0, k, xbuf);
        // INT4: groups are even and chunks start at even elements, so k and e0 are even.
        uint8_t* dst = bits == 8 ? codes + e0 : cbuf;
        if (stochastic) {
          encode<true>(v, stream.at(seed, offset + static_cast<uint64_t>(e0), k), k, scale, zero, qmax, dst);
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
