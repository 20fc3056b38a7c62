// Philox4x32-10 counter-based generator (Salmon et al., SC'11), shared by the C++ CPU and CUDA
// kernels. Same stream as fastgrad/_reference.py::philox_uint32 and Triton's tl.randint:
// key = 64-bit seed (k0 low word, k1 high word), counter = offset + element index
// (c0 low word, c1 high word, c2 = c3 = 0), output word 0.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTGRAD_HD __host__ __device__ __forceinline__
#else
#define FASTGRAD_HD inline
#endif

namespace fastgrad {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Word 0 of Philox4x32-10 for the 64-bit counter `counter` under the 64-bit key `seed`.
FASTGRAD_HD uint32_t philox_uint32(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
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
  return c0;
}

// Uniform in [0, 1) with 24 random bits: exactly representable in fp32.
FASTGRAD_HD float philox_uniform(uint64_t seed, uint64_t counter) {
  return static_cast<float>(philox_uint32(seed, counter) >> 8) * (1.0f / 16777216.0f);
}

}  // namespace fastgrad
