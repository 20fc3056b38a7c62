// Philox4x32-10 counter-based generator (Salmon et al., SC'11), shared by the C++ CPU and CUDA
// kernels. The random stream of fastgrad/_reference.py::philox_uint32 and Triton's tl.randint4x:
// key = 64-bit seed (k0 low word, k1 high word); the element at stream position p = offset + i
// takes word p % 4 of the block at counter p / 4 (c0 low word, c1 high word, c2 = c3 = 0), so one
// Philox evaluation serves four consecutive positions.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTGRAD_HD __host__ __device__ __forceinline__
#define FASTGRAD_UNROLL _Pragma("unroll")
#else
#define FASTGRAD_HD inline
#define FASTGRAD_UNROLL
#endif

namespace fastgrad {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// The four output words of Philox4x32-10 for the 64-bit counter `counter` under the key `seed`.
struct PhiloxBlock {
  uint32_t w[4];
};

FASTGRAD_HD PhiloxBlock philox_block(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
FASTGRAD_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {{c0, c1, c2, c3}};
}

// The random word of stream position `position`: word position % 4 of block position / 4.
// One evaluation per word; loops over consecutive positions draw whole blocks instead.
FASTGRAD_HD uint32_t philox_uint32(uint64_t seed, uint64_t position) {
  const PhiloxBlock b = philox_block(seed, position >> 2);
  const uint32_t word = static_cast<uint32_t>(position & 3);
  // Selects, not b.w[word]: a dynamic index would put the block in CUDA local memory.
  return word == 0 ? b.w[0] : word == 1 ? b.w[1] : word == 2 ? b.w[2] : b.w[3];
}

// out[e] = the word of stream position first + e, e < N: N / 4 Philox evaluations when first and N
// are multiples of 4 (the usual case: callers advance offsets by tensor sizes and draw whole packs),
// else one per word. Static indices only, so the words stay in registers on a GPU.
template <int N>
FASTGRAD_HD void philox_run(uint64_t seed, uint64_t first, uint32_t (&out)[N]) {
  if (N % 4 == 0 && (first & 3) == 0) {
FASTGRAD_UNROLL
    for (int b = 0; b < N / 4; ++b) {
      const PhiloxBlock blk = philox_block(seed, (first >> 2) + static_cast<uint64_t>(b));
      FASTGRAD_UNROLL
      for (int w = 0; w < 4; ++w) out[4 * b + w] = blk.w[w];
    }
  } else {
FASTGRAD_UNROLL
    for (int e = 0; e < N; ++e) out[e] = philox_uint32(seed, first + static_cast<uint64_t>(e));
  }
}

// The uniform in [0, 1) of a random word: 24 random bits, exactly representable in fp32.
FASTGRAD_HD float word_to_uniform(uint32_t word) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

// The uniform of stream position `position`.
FASTGRAD_HD float philox_uniform(uint64_t seed, uint64_t position) { return word_to_uniform(philox_uint32(seed, position)); }

}  // namespace fastgrad
