// fp32 -> bf16 stochastic rounding on CPU (math: fastgrad/_reference.py::round_bf16_stochastic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "philox_cpu.h"
#include "quant_common.h"

namespace fastgrad {
namespace {

// x: (*) float32, contiguous -> (*) bfloat16 (qmath::round_bf16_sr, shared with the CUDA kernel):
// adds a uniform 16-bit integer to the fp32 bit pattern and truncates the low half, so the
// magnitude rounds up with probability equal to the discarded fraction; a NaN stays a NaN.
at::Tensor round_bf16_stochastic_cpu(const at::Tensor& x, int64_t seed, int64_t offset) {
  check_round_bf16("round_bf16_stochastic", x, seed, offset);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const float* src = x.data_ptr<float>();
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint64_t base = static_cast<uint64_t>(offset);
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    cpu::PhiloxWindow<cpu::kChunk> stream;
    for (int64_t c = begin; c < end; c += cpu::kChunk) {
      const int64_t k = std::min(cpu::kChunk, end - c);
      const uint32_t* words = stream.at(key, base + static_cast<uint64_t>(c), k);
      for (int64_t i = 0; i < k; ++i) dst[c + i] = qmath::round_bf16_sr(src[c + i], words[i]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgrad, CPU, m) { m.impl("round_bf16_stochastic", &round_bf16_stochastic_cpu); }

}  // namespace fastgrad
