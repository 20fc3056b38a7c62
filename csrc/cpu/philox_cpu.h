// Bulk Philox words on the CPU: the random stream of csrc/common/philox.h for runs of consecutive
// positions, four words per Philox evaluation. Used by the stochastic rounding of quant.cpp
// (quantizers, and through them the INT8-weight Adam step) and round_bf16.cpp.
//
// Philox is most of stochastic rounding's cost, so it gets explicit intrinsics: 32x32->64 products
// with vpmuludq on the even and odd lanes, then blends. AVX-512 (16 counters per vector) where the
// CPU has it, chosen at run time (FASTGRAD_NO_AVX512=1 forces AVX2, so tests reach both); AVX2 (8)
// otherwise, about 2x faster than what gcc makes of the portable loop, which is kept for other
// targets (the rounds on local lane arrays, the high half as a widening multiply: a form gcc
// vectorizes). All produce exactly the words of fastgrad::philox_block.
#pragma once
#include <cstdint>
#include <cstdlib>

#include "../common/philox.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastgrad {
namespace cpu {

// philox_words draws multiples of this many positions: 32 counters x 4 words.
constexpr int64_t kPhiloxRun = 128;

#if defined(__AVX2__)
inline void mul_hi_lo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                        // lanes 0,2,4,6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// out[i] = word of stream position first + i, i < n. first % 4 == 0, n % kPhiloxRun == 0.
inline void philox_words_avx2(uint64_t seed, uint64_t first, int64_t n, uint32_t* __restrict out) {
  constexpr int V = 2;  // independent 8-counter vectors per step, for instruction-level parallelism
  static_assert(kPhiloxRun % (8 * V * 4) == 0, "kPhiloxRun: runs of V vectors of 8 counters, 4 words each");
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t b = 0; b < n; b += 8 * V * 4) {
    __m256i c0[V], c1[V], c2[V], c3[V];
    for (int v = 0; v < V; ++v) {
      const uint64_t ctr = (first + static_cast<uint64_t>(b)) / 4 + static_cast<uint64_t>(8 * v);
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
      // 4x8 transpose: counter j's words w0..w3 go to positions 4j..4j+3.
      const __m256i t0 = _mm256_unpacklo_epi32(c0[v], c1[v]);  // a0 b0 a1 b1 | a4 b4 a5 b5
      const __m256i t1 = _mm256_unpackhi_epi32(c0[v], c1[v]);  // a2 b2 a3 b3 | a6 b6 a7 b7
      const __m256i t2 = _mm256_unpacklo_epi32(c2[v], c3[v]);
      const __m256i t3 = _mm256_unpackhi_epi32(c2[v], c3[v]);
      const __m256i u0 = _mm256_unpacklo_epi64(t0, t2);  // counters 0 | 4
      const __m256i u1 = _mm256_unpackhi_epi64(t0, t2);  // counters 1 | 5
      const __m256i u2 = _mm256_unpacklo_epi64(t1, t3);  // counters 2 | 6
      const __m256i u3 = _mm256_unpackhi_epi64(t1, t3);  // counters 3 | 7
      __m256i* dst = reinterpret_cast<__m256i*>(out + b + 32 * v);
      _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
      _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
      _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
      _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
    }
  }
}

__attribute__((target("avx512f"))) inline void mul_hi_lo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// The same with 16 counters per vector; compiled for AVX-512F whatever the build flags.
__attribute__((target("avx512f"))) inline void philox_words_avx512(uint64_t seed, uint64_t first, int64_t n,
                                                                   uint32_t* __restrict out) {
  constexpr int V = 2;
  static_assert(kPhiloxRun % (16 * V * 4) == 0, "kPhiloxRun: runs of V vectors of 16 counters, 4 words each");
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t b = 0; b < n; b += 16 * V * 4) {
    __m512i c0[V], c1[V], c2[V], c3[V];
    for (int v = 0; v < V; ++v) {
      const uint64_t ctr = (first + static_cast<uint64_t>(b)) / 4 + static_cast<uint64_t>(16 * v);
      const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr)));
      c0[v] = _mm512_add_epi32(lo, lane);
      const __mmask16 wrapped = _mm512_cmplt_epu32_mask(c0[v], lo);  // the low word wrapped: carry
      const __m512i high = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr >> 32)));
      c1[v] = _mm512_mask_add_epi32(high, wrapped, high, one);
      c2[v] = _mm512_setzero_si512();
      c3[v] = _mm512_setzero_si512();
    }
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
      const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < V; ++v) {
        __m512i hi0, lo0, hi1, lo1;
        mul_hi_lo(c0[v], m0, hi0, lo0);
        mul_hi_lo(c2[v], m1, hi1, lo1);
        const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1[v]), key0);
        const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3[v]), key1);
        c1[v] = lo1;
        c3[v] = lo0;
        c0[v] = n0;
        c2[v] = n2;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int v = 0; v < V; ++v) {
      // 4x16 transpose: within each 128-bit lane as in AVX2, then the 128-bit blocks 4x4.
      const __m512i t0 = _mm512_unpacklo_epi32(c0[v], c1[v]);
      const __m512i t1 = _mm512_unpackhi_epi32(c0[v], c1[v]);
      const __m512i t2 = _mm512_unpacklo_epi32(c2[v], c3[v]);
      const __m512i t3 = _mm512_unpackhi_epi32(c2[v], c3[v]);
      const __m512i u0 = _mm512_unpacklo_epi64(t0, t2);  // counters 0 | 4 | 8 | 12
      const __m512i u1 = _mm512_unpackhi_epi64(t0, t2);  // counters 1 | 5 | 9 | 13
      const __m512i u2 = _mm512_unpacklo_epi64(t1, t3);  // counters 2 | 6 | 10 | 14
      const __m512i u3 = _mm512_unpackhi_epi64(t1, t3);  // counters 3 | 7 | 11 | 15
      const __m512i a = _mm512_shuffle_i32x4(u0, u1, 0x44);  // 0 4 1 5
      const __m512i bb = _mm512_shuffle_i32x4(u2, u3, 0x44);  // 2 6 3 7
      const __m512i c = _mm512_shuffle_i32x4(u0, u1, 0xEE);  // 8 12 9 13
      const __m512i d = _mm512_shuffle_i32x4(u2, u3, 0xEE);  // 10 14 11 15
      uint32_t* dst = out + b + 64 * v;
      _mm512_storeu_si512(dst + 0, _mm512_shuffle_i32x4(a, bb, 0x88));   // 0 1 2 3
      _mm512_storeu_si512(dst + 16, _mm512_shuffle_i32x4(a, bb, 0xDD));  // 4 5 6 7
      _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(c, d, 0x88));   // 8 9 10 11
      _mm512_storeu_si512(dst + 48, _mm512_shuffle_i32x4(c, d, 0xDD));   // 12 13 14 15
    }
  }
}

inline bool use_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && std::getenv("FASTGRAD_NO_AVX512") == nullptr;
  return yes;
}

// out[i] = word of stream position first + i, i < n. first % 4 == 0, n % kPhiloxRun == 0.
inline void philox_words(uint64_t seed, uint64_t first, int64_t n, uint32_t* __restrict out) {
  if (use_avx512()) {
    philox_words_avx512(seed, first, n, out);
  } else {
    philox_words_avx2(seed, first, n, out);
  }
}
#else
inline void philox_words(uint64_t seed, uint64_t first, int64_t n, uint32_t* __restrict out) {
  constexpr int L = 16;
  static_assert(kPhiloxRun % (L * 4) == 0, "kPhiloxRun: runs of L counters, 4 words each");
  for (int64_t b = 0; b < n; b += L * 4) {
    uint32_t c0[L], c1[L], c2[L], c3[L];
    for (int l = 0; l < L; ++l) {
      const uint64_t ctr = (first + static_cast<uint64_t>(b)) / 4 + static_cast<uint64_t>(l);
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
      out[b + 4 * l + 0] = c0[l];
      out[b + 4 * l + 1] = c1[l];
      out[b + 4 * l + 2] = c2[l];
      out[b + 4 * l + 3] = c3[l];
    }
  }
}
#endif

// A window of the stream: the words of positions [begin, end), begin % 4 == 0. A run [p, p + k)
// (k <= kMaxRun) outside it refills it from p rounded down to a multiple of 4, with the fewest
// whole kPhiloxRun draws that cover the run; runs shorter than that reuse the words left over.
template <int64_t kMaxRun>
struct PhiloxWindow {
  static constexpr int64_t kWords = (kMaxRun + 3 + kPhiloxRun - 1) / kPhiloxRun * kPhiloxRun;
  alignas(64) uint32_t words[kWords];
  uint64_t begin = 0, end = 0;  // empty until the first refill

  // The words of positions [p, p + k), k <= kMaxRun.
  const uint32_t* at(uint64_t seed, uint64_t p, int64_t k) {
    if (p < begin || p + static_cast<uint64_t>(k) > end) {
      begin = p & ~uint64_t{3};
      const int64_t n = (static_cast<int64_t>(p - begin) + k + kPhiloxRun - 1) / kPhiloxRun * kPhiloxRun;
      end = begin + static_cast<uint64_t>(n);
      philox_words(seed, begin, n, words);
    }
    return words + (p - begin);
  }
};

}  // namespace cpu
}  // namespace fastgrad
