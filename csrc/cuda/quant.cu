// Group-wise INT8/INT4 quantization, dequantization and fp32 -> bf16 stochastic rounding on CUDA.
// Math: fastgrad/_reference.py (quantize / dequantize / pack_int4 / round_bf16_stochastic); the
// per-element functions are csrc/common/quant_math.h, shared with the host harness of
// tests/test_cuda_math.py. Codes, scales and zeros are bitwise those of the reference and of the
// CPU kernels (csrc/cpu/quant.cpp) for every dtype, group size and (seed, offset): the Philox word
// of stream position offset + flat index (csrc/common/philox.h), correctly rounded fp32 division,
// no FMA contraction.
//
// Layout: a contiguous x of shape (*, n) with groups of g consecutive values of the last dimension
// is, in memory, `groups = numel / g` groups of g contiguous values; group q starts at flat index
// q * g and its scale/zero are scales[q]/zeros[q]. The kernels see only that flat view. Offsets
// and sizes are 64-bit everywhere.
//
// Kernels (all memory-bound; 256-thread blocks; grid-stride loops; 16-byte packs whenever the
// group size and the pointer's alignment allow, narrower packs or element loads otherwise):
//   quantize_warp_kernel   groups of up to 32 * ITEMS packs (1024 fp32 / 2048 bf16 values with
//                          16-byte packs): a team of <= 32 lanes per group, values kept in
//                          registers between the statistics and the encode, shuffle reductions
//   quantize_block_kernel  larger groups (whole rows): a block per group, staged in shared memory
//                          (up to 96 KB) so that x is read once; beyond, a second read (L2); few
//                          huge groups are split over blocks (partial stats, then encode)
//   dequantize_kernel      16 values per thread step (one 16-byte INT8 / 8-byte INT4 load)
//   round_bf16_kernel      4 values per thread step (16-byte load, 8-byte store)
//
// Includes: c10/cuda headers only (stream, guard, error check). ATen/cuda/CUDAContext.h would pull
// in cuBLAS/cuSPARSE headers, which are not needed here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/checks.h"
#include "../common/philox.h"
#include "../common/quant_math.h"

namespace fastgrad {
namespace {

constexpr int kThreads = 256;  // block size of every kernel
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxStageBytes = 96 * 1024;  // largest group the block kernel keeps in shared memory
constexpr int kMaxCachedDevices = 64;  // per-device caches below; a device index beyond: no caching

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

// Input element: storage type and exact conversion to fp32.
template <typename T>
struct In;
template <>
struct In<float> {
  using S = float;
  static __device__ __forceinline__ float f32(S v) { return v; }
};
template <>
struct In<at::BFloat16> {
  using S = uint16_t;
  static __device__ __forceinline__ float f32(S v) { return qmath::bf16_bits_to_float(v); }
};
template <>
struct In<at::Half> {
  using S = uint16_t;
  static __device__ __forceinline__ float f32(S v) { return __half2float(__ushort_as_half(v)); }
};

// Output element: storage type and fp32 -> storage, round to nearest even (torch's `.to()`).
// bf16 NaN -> 0xFFFF as the CPU kernels write it; fp16 through the hardware conversion.
template <typename T>
struct Out;
template <>
struct Out<float> {
  using S = float;
  static __device__ __forceinline__ S from(float f) { return f; }
};
template <>
struct Out<at::BFloat16> {
  using S = uint16_t;
  static __device__ __forceinline__ S from(float f) { return qmath::float_to_bf16_rne(f); }
};
template <>
struct Out<at::Half> {
  using S = uint16_t;
  static __device__ __forceinline__ S from(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// N consecutive elements moved as one aligned access (16 bytes at most: one LDG.128/STG.128).
template <typename S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

// One pack from p; `aligned` (uniform) says p is aligned to the pack size, else element loads.
template <typename S, int N>
__device__ __forceinline__ Pack<S, N> load_pack(const S* __restrict__ p, bool aligned) {
  if (aligned) return *reinterpret_cast<const Pack<S, N>*>(p);
  Pack<S, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = p[i];
  return r;
}

// Packs a thread keeps in registers per pass: 128 bytes of 16-byte packs, 16 smaller packs.
template <typename S, int VEC>
constexpr int items_for() {
  return VEC * static_cast<int>(sizeof(S)) >= 16 ? 8 : 16;
}

int sm_count(int device) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  if (device >= 0 && device < kMaxCachedDevices) {
    int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  v = std::max(v, 1);
  if (device >= 0 && device < kMaxCachedDevices) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Shared memory a block of the quantizer may use for its stage (opt-in above 48 KB).
int64_t max_stage_bytes(int device) {
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  int v = device >= 0 && device < kMaxCachedDevices ? cache[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    v = std::max(v, 48 * 1024);
    if (device >= 0 && device < kMaxCachedDevices) cache[device].store(v, std::memory_order_relaxed);
  }
  // Leave room for the block's static shared memory.
  return std::min<int64_t>(kMaxStageBytes, v - 1024);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// ---------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------

struct QuantArgs {
  const void* x;       // (groups * g,) input values, In<T>::S
  uint8_t* codes;      // (groups * g * BITS / 8,) uint8; INT4: element 2j low nibble of byte j
  float* scales;       // (groups,) fp32
  float* zeros;        // (groups,) fp32
  float* partial;      // (groups * splits, 2) fp32 partial (lo, hi); block kernel modes 1 and 2
  int64_t groups;      // number of groups
  int64_t vecs;        // packs of VEC values per group: g / VEC
  int64_t splits;      // slices per group (block kernel; 1 unless too few groups to fill the device)
  int64_t split_vecs;  // packs per slice
  uint64_t seed, offset;
  int tpg;             // warp kernel: threads per group (a "team"), a power of two <= 32
  int mode;            // block kernel: 0 stats + encode; 1 partial stats of a slice; 2 encode a slice
  bool symmetric, stochastic;
  bool aligned;        // x is aligned to VEC * sizeof(S) (else element loads)
  bool staged;         // block kernel, mode 0: the group is kept in shared memory between the passes
};

// Encodes one pack of VEC values starting at flat index e0 and stores its codes.
//   u = (x - zero) / scale (IEEE division); RTN floor(u + 0.5) | SR floor(u) + (xi < u - floor(u)),
//   xi = word_to_uniform(word of stream position offset + flat index); clamp to [0, qmax] (NaN -> 0);
//   INT4: codes 2j, 2j+1 -> low, high nibble of one byte.
template <typename T, int BITS, int VEC>
__device__ __forceinline__ void encode_pack(const QuantArgs& a, const Pack<typename In<T>::S, VEC>& xp, int64_t e0,
                                            qmath::Affine af) {
  constexpr int kCodeBytes = VEC * BITS / 8;  // >= 1: INT4 packs hold an even number of values
  static_assert(kCodeBytes >= 1, "INT4 needs VEC >= 2");
  const float qmax = static_cast<float>((1 << BITS) - 1);
  uint32_t words[VEC] = {};
  if (a.stochastic) philox_run(a.seed, a.offset + static_cast<uint64_t>(e0), words);
  uint32_t code[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float xi = a.stochastic ? word_to_uniform(words[e]) : 0.0f;
    code[e] = qmath::encode(In<T>::f32(xp.v[e]), af, qmax, a.stochastic, xi);
  }
  Pack<uint8_t, kCodeBytes> out;
#pragma unroll
  for (int j = 0; j < kCodeBytes; ++j) {
    out.v[j] = static_cast<uint8_t>(BITS == 8 ? code[j] : qmath::pack_nibbles(code[2 * j], code[2 * j + 1]));
  }
  // Aligned: codes is a fresh allocation and e0 is a multiple of VEC.
  *reinterpret_cast<Pack<uint8_t, kCodeBytes>*>(a.codes + e0 * BITS / 8) = out;
}

template <typename T, int VEC>
__device__ __forceinline__ void stats_pack(qmath::Stats& st, const Pack<typename In<T>::S, VEC>& xp, bool symmetric) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) qmath::stats_add(st, In<T>::f32(xp.v[e]), symmetric);
}

// Groups that fit in a warp's registers (g <= 32 * ITEMS * VEC): a team of tpg <= 32 lanes per group
// (several groups per warp when tpg < 32), one read of x.
//   stats:  asymmetric (min, max) | symmetric absmax, NaN-propagating; xor-shuffle butterfly over
//           the team's lanes (every lane ends with the team's result)
//   affine: scale = (max - min) / qmax | absmax / (qmax // 2), <= 0 or NaN -> 1;
//           zero = min | -2**(BITS-1) * scale
//   encode: encode_pack on the packs still in registers
// Lane l of a team holds packs l, l + tpg, ..., l + (ITEMS-1) tpg of VEC consecutive values: every
// load instruction of a team reads tpg consecutive packs (coalesced), ITEMS independent loads in
// flight per thread. Grid-stride loop over groups.
template <typename T, int BITS, int VEC, int ITEMS>
__global__ void __launch_bounds__(kThreads) quantize_warp_kernel(const QuantArgs a) {
  using S = typename In<T>::S;
  using XPack = Pack<S, VEC>;
  const S* __restrict__ x = static_cast<const S*>(a.x);
  const int tpg = a.tpg;
  const int lane = threadIdx.x & (tpg - 1);
  const int teams = blockDim.x / tpg;
  const int64_t g = a.vecs * VEC;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * teams; first < a.groups;
       first += static_cast<int64_t>(gridDim.x) * teams) {  // uniform over the block
    const int64_t grp = first + threadIdx.x / tpg;
    const int64_t v_end = grp < a.groups ? a.vecs : 0;  // teams past the end only join the shuffles
    const S* __restrict__ xg = x + grp * g;
    qmath::Stats st = qmath::stats_init(a.symmetric);
    XPack cache[ITEMS];
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t v = static_cast<int64_t>(k) * tpg + lane;
      if (v < v_end) {
        cache[k] = load_pack<S, VEC>(xg + v * VEC, a.aligned);
        stats_pack<T, VEC>(st, cache[k], a.symmetric);
      }
    }
    for (int off = tpg >> 1; off > 0; off >>= 1) {  // all 32 lanes of the warp take part
      qmath::Stats o;
      o.hi = __shfl_xor_sync(0xffffffffu, st.hi, off);
      o.lo = a.symmetric ? st.lo : __shfl_xor_sync(0xffffffffu, st.lo, off);
      qmath::stats_merge(st, o);
    }
    const qmath::Affine af = qmath::group_affine(st, BITS, a.symmetric);
    if (v_end > 0 && lane == 0) {
      a.scales[grp] = af.scale;
      a.zeros[grp] = af.zero;
    }
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t v = static_cast<int64_t>(k) * tpg + lane;
      if (v < v_end) encode_pack<T, BITS, VEC>(a, cache[k], grp * g + v * VEC, af);
    }
  }
}

// Block statistics: warp butterflies, then the warps' partials through shared memory. Every
// thread of the block calls it and gets the result; it synchronizes the block (which also
// publishes the shared-memory stage written before it).
__device__ __forceinline__ qmath::Stats block_reduce(qmath::Stats s, bool symmetric, float* red) {
  for (int off = 16; off > 0; off >>= 1) {
    qmath::Stats o;
    o.hi = __shfl_xor_sync(0xffffffffu, s.hi, off);
    o.lo = symmetric ? s.lo : __shfl_xor_sync(0xffffffffu, s.lo, off);
    qmath::stats_merge(s, o);
  }
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // the previous unit's readers are done with red
  if ((threadIdx.x & 31) == 0) {
    red[warp] = s.lo;
    red[kWarps + warp] = s.hi;
  }
  __syncthreads();
  s.lo = red[0];
  s.hi = red[kWarps];
  for (int w = 1; w < kWarps; ++w) qmath::stats_merge(s, qmath::Stats{red[w], red[kWarps + w]});
  return s;
}

// Groups too large for a warp: one block of kThreads per work unit (a group, or a slice of one).
// Same math as quantize_warp_kernel (stats, affine, encode_pack); thread t handles packs t,
// t + kThreads, ... with kUnroll loads in flight.
//   mode 0: stats pass then encode pass over the group; when `staged`, the first pass also copies
//           the group into dynamic shared memory and the second reads it from there (x is read
//           from memory once); otherwise the second pass reads x again (mostly from L2).
//   mode 1: partial (min, max) of each slice -> partial[unit]          (few very large groups:
//   mode 2: fold the group's partials (exact), encode the slice;        two launches fill the
//           slice 0 stores scale and zero.                              device)
template <typename T, int BITS, int VEC>
__global__ void __launch_bounds__(kThreads) quantize_block_kernel(const QuantArgs a) {
  using S = typename In<T>::S;
  using XPack = Pack<S, VEC>;
  constexpr int kUnroll = 4;
  extern __shared__ __align__(16) unsigned char stage_bytes[];
  XPack* stage = reinterpret_cast<XPack*>(stage_bytes);
  __shared__ float red[2 * kWarps];
  const S* __restrict__ x = static_cast<const S*>(a.x);
  const int64_t units = a.groups * a.splits;
  const int64_t g = a.vecs * VEC;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {  // uniform over the block
    const int64_t grp = a.splits == 1 ? unit : unit / a.splits;
    const int64_t split = unit - grp * a.splits;
    const int64_t v_begin = split * a.split_vecs;
    const int64_t v_end = min(v_begin + a.split_vecs, a.vecs);
    const S* __restrict__ xg = x + grp * g;
    const bool staged = a.staged && a.mode == 0;

    qmath::Stats st = qmath::stats_init(a.symmetric);
    if (a.mode != 2) {
      for (int64_t v0 = v_begin + threadIdx.x; v0 < v_end; v0 += kUnroll * kThreads) {
        XPack p[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = v0 + u * kThreads;
          if (v < v_end) p[u] = load_pack<S, VEC>(xg + v * VEC, a.aligned);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t v = v0 + u * kThreads;
          if (v < v_end) {
            stats_pack<T, VEC>(st, p[u], a.symmetric);
            if (staged) stage[v - v_begin] = p[u];
          }
        }
      }
    } else {
      for (int64_t s = threadIdx.x; s < a.splits; s += kThreads) {
        const float* pp = a.partial + 2 * (grp * a.splits + s);
        qmath::stats_merge(st, qmath::Stats{pp[0], pp[1]});
      }
    }
    st = block_reduce(st, a.symmetric, red);
    if (a.mode == 1) {
      if (threadIdx.x == 0) {
        a.partial[2 * unit] = st.lo;
        a.partial[2 * unit + 1] = st.hi;
      }
      continue;
    }
    const qmath::Affine af = qmath::group_affine(st, BITS, a.symmetric);
    if (split == 0 && threadIdx.x == 0) {
      a.scales[grp] = af.scale;
      a.zeros[grp] = af.zero;
    }
    for (int64_t v0 = v_begin + threadIdx.x; v0 < v_end; v0 += kUnroll * kThreads) {
      XPack p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + u * kThreads;
        if (v < v_end) p[u] = staged ? stage[v - v_begin] : load_pack<S, VEC>(xg + v * VEC, a.aligned);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + u * kThreads;
        if (v < v_end) encode_pack<T, BITS, VEC>(a, p[u], grp * g + v * VEC, af);
      }
    }
    if (staged) __syncthreads();  // the next unit overwrites the stage
  }
}

// Lets quantize_block_kernel<T, BITS, VEC> take `smem` bytes of dynamic shared memory on `device`
// (the current device), which a launch above 48 KB needs. cudaFuncSetAttribute is a driver call and
// the limit it sets stays with the kernel on that device, so it runs once per instantiation and
// device, not per launch: it sets the largest stage quantize_groups ever asks for there
// (max_stage_bytes), and `set` records it. Thread-safe: racing first launches both set the same
// value (harmless); one that reads the recorded value (acquire) sees the call that preceded its
// store (release). A device index past the table sets it on every such launch.
template <typename T, int BITS, int VEC>
void allow_block_smem(int device, size_t smem) {
  static std::atomic<int64_t> set[kMaxCachedDevices] = {};  // bytes allowed, per device; 0: default
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  const int64_t need = static_cast<int64_t>(smem);
  if (cached && need <= set[device].load(std::memory_order_acquire)) return;
  const int64_t bytes = std::max(need, max_stage_bytes(device));
  C10_CUDA_CHECK(cudaFuncSetAttribute(quantize_block_kernel<T, BITS, VEC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (cached) set[device].store(bytes, std::memory_order_release);
}

// Launches one of the two kernels for the pack width `vec` (runtime) of input T on `device`.
template <typename T, int BITS, int VEC>
void launch_quantize(bool warp_kernel, const QuantArgs& a, int64_t blocks, size_t smem, int device,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks));
  if (warp_kernel) {
    constexpr int kItems = items_for<typename In<T>::S, VEC>();
    quantize_warp_kernel<T, BITS, VEC, kItems><<<grid, kThreads, 0, stream>>>(a);
  } else {
    if (smem > 48 * 1024) allow_block_smem<T, BITS, VEC>(device, smem);
    quantize_block_kernel<T, BITS, VEC><<<grid, kThreads, smem, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BITS>
void launch_quantize_vec(int vec, bool warp_kernel, const QuantArgs& a, int64_t blocks, size_t smem, int device,
                         cudaStream_t stream) {
  constexpr bool kWide = sizeof(typename In<T>::S) == 2;  // 16-bit inputs: 8 values per 16 bytes
  switch (vec) {
    case 1:
      if constexpr (BITS == 8) return launch_quantize<T, BITS, 1>(warp_kernel, a, blocks, smem, device, stream);
      break;
    case 2:
      return launch_quantize<T, BITS, 2>(warp_kernel, a, blocks, smem, device, stream);
    case 4:
      return launch_quantize<T, BITS, 4>(warp_kernel, a, blocks, smem, device, stream);
    case 8:
      if constexpr (kWide) return launch_quantize<T, BITS, 8>(warp_kernel, a, blocks, smem, device, stream);
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "fastgrad quantize_cuda: no kernel for pack width ", vec);
}

// Plans and launches the quantization of `groups` groups of g values of x.
//   pack width: the widest pack (<= 16 bytes) that tiles every group (INT4 groups are even: >= 2)
//   g <= 32 * ITEMS packs: warp kernel, team = fewest lanes that hold the group in registers, but
//     at least the lanes that fill a 32-byte sector with consecutive packs
//   larger: block kernel, the group staged in shared memory when it fits (<= kMaxStageBytes);
//     when there are fewer groups than SMs and they are large, each is split into slices so that
//     about 4 blocks per SM run (two launches: partial stats, then encode)
template <typename T>
void quantize_groups(int bits, const at::Tensor& x, int64_t groups, int64_t g, bool symmetric, bool stochastic,
                     uint64_t seed, uint64_t offset, at::Tensor& codes, at::Tensor& scales, at::Tensor& zeros) {
  using S = typename In<T>::S;
  constexpr int kElem = sizeof(S);
  int vec = 16 / kElem;
  while (g % vec != 0) vec >>= 1;
  const int pack_bytes = vec * kElem;
  const int items = pack_bytes >= 16 ? 8 : 16;  // == items_for<S, vec>()
  const int64_t vecs = g / vec;
  const int device = x.get_device();
  const int sms = sm_count(device);

  QuantArgs a{};
  a.x = x.const_data_ptr();
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = scales.data_ptr<float>();
  a.zeros = zeros.data_ptr<float>();
  a.groups = groups;
  a.vecs = vecs;
  a.splits = 1;
  a.split_vecs = vecs;
  a.seed = seed;
  a.offset = offset;
  a.tpg = 1;
  a.mode = 0;
  a.symmetric = symmetric;
  a.stochastic = stochastic;
  a.aligned = reinterpret_cast<uintptr_t>(a.x) % static_cast<uintptr_t>(pack_bytes) == 0;
  a.staged = false;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](bool warp_kernel, int64_t blocks, size_t smem) {
    if (bits == 8) {
      launch_quantize_vec<T, 8>(vec, warp_kernel, a, blocks, smem, device, stream);
    } else {
      launch_quantize_vec<T, 4>(vec, warp_kernel, a, blocks, smem, device, stream);
    }
  };
  const int64_t max_blocks = static_cast<int64_t>(sms) * (2048 / kThreads) * 8;  // then grid-stride

  if (vecs <= 32 * static_cast<int64_t>(items)) {
    int64_t tpg = next_pow2(ceil_div(vecs, items));
    tpg = std::max<int64_t>(tpg, std::min<int64_t>(next_pow2(vecs), std::max(1, 32 / pack_bytes)));
    a.tpg = static_cast<int>(std::min<int64_t>(tpg, 32));
    const int64_t teams = kThreads / a.tpg;
    launch(true, std::max<int64_t>(1, std::min(ceil_div(groups, teams), max_blocks)), 0);
    return;
  }
  // Slices: only when the groups cannot fill the device and each is worth several blocks.
  constexpr int64_t kMinSliceVecs = 4 * kThreads * 4;  // 4 loads of kUnroll packs per thread
  if (groups < sms && vecs >= 2 * kMinSliceVecs) {
    int64_t splits = std::min(vecs / kMinSliceVecs, ceil_div(4 * static_cast<int64_t>(sms), groups));
    a.split_vecs = ceil_div(vecs, splits);
    a.splits = ceil_div(vecs, a.split_vecs);  // no empty slice
    at::Tensor partial = at::empty({groups * a.splits, 2}, x.options().dtype(at::kFloat));
    a.partial = partial.data_ptr<float>();
    const int64_t blocks = std::min(groups * a.splits, max_blocks);
    a.mode = 1;
    launch(false, blocks, 0);
    a.mode = 2;
    launch(false, blocks, 0);  // same stream: the allocator reuses `partial` only after both ran
    return;
  }
  const int64_t stage_bytes = vecs * pack_bytes;
  a.staged = stage_bytes <= max_stage_bytes(device);
  launch(false, std::min(groups, max_blocks), a.staged ? static_cast<size_t>(stage_bytes) : 0);
}

// x: (*, n) float32/bfloat16/float16, contiguous, CUDA -> codes (*, n * bits / 8) uint8,
// scales (*, n / g) fp32, zeros (*, n / g) fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const char* op, int bits, const at::Tensor& x,
                                                             int64_t group_size, bool symmetric, bool stochastic,
                                                             int64_t seed, int64_t offset) {
  const int64_t g = check_quantize(op, bits, x, group_size, seed, offset, at::kCUDA);
  const auto dt = x.scalar_type();
  const int64_t n = x.size(-1);
  const int64_t numel = x.numel();

  const c10::cuda::CUDAGuard guard(x.device());
  auto code_shape = x.sizes().vec();
  code_shape.back() = n * bits / 8;
  auto group_shape = x.sizes().vec();
  group_shape.back() = n / g;
  at::Tensor codes = at::empty(code_shape, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty(group_shape, x.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty(group_shape, x.options().dtype(at::kFloat));
  if (numel == 0) return {codes, scales, zeros};

  const int64_t groups = numel / g;
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  if (dt == at::kFloat) {
    quantize_groups<float>(bits, x, groups, g, symmetric, stochastic, s, o, codes, scales, zeros);
  } else if (dt == at::kBFloat16) {
    quantize_groups<at::BFloat16>(bits, x, groups, g, symmetric, stochastic, s, o, codes, scales, zeros);
  } else {
    quantize_groups<at::Half>(bits, x, groups, g, symmetric, stochastic, s, o, codes, scales, zeros);
  }
  return {codes, scales, zeros};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x, int64_t group_size,
                                                                  bool symmetric, bool stochastic, int64_t seed,
                                                                  int64_t offset) {
  return quantize_cuda("quantize_int8", 8, x, group_size, symmetric, stochastic, seed, offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_cuda(const at::Tensor& x, int64_t group_size,
                                                                  bool symmetric, bool stochastic, int64_t seed,
                                                                  int64_t offset) {
  return quantize_cuda("quantize_int4", 4, x, group_size, symmetric, stochastic, seed, offset);
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

struct DequantArgs {
  const uint8_t* codes;     // (groups * g * BITS / 8,) uint8
  const float* scales;      // (groups,) fp32
  const float* zeros;       // (groups,) fp32
  void* out;                // (groups * g,) Out<O>::S
  int64_t packs;            // groups * g / E
  int64_t packs_per_group;  // g / E
  bool aligned;             // codes aligned to E * BITS / 8 bytes (else byte loads)
  bool narrow;              // packs < 2**32: 32-bit division for the group index
};

// out[i] = O(code[i] * scale[grp] + zero[grp]): fp32 multiply, then add, each correctly rounded
// (no FMA), then round to nearest even into O. A thread decodes packs of E values of one group
// (E divides g): E * BITS / 8 code bytes in, E outputs stored 16 bytes at a time; U packs per
// thread per grid-stride step, loads issued before any store.
template <typename O, int BITS, int E>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const DequantArgs a) {
  using OS = typename Out<O>::S;
  constexpr int kCodeBytes = E * BITS / 8;
  constexpr int kOutVec = E < 16 / static_cast<int>(sizeof(OS)) ? E : 16 / static_cast<int>(sizeof(OS));
  constexpr int U = 4;
  using CPack = Pack<uint8_t, kCodeBytes>;
  using OPack = Pack<OS, kOutVec>;
  OS* __restrict__ out = static_cast<OS*>(a.out);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p0 < a.packs; p0 += stride * U) {
    CPack cp[U];
    float sc[U], ze[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = p0 + u * stride;
      if (p < a.packs) {
        cp[u] = load_pack<uint8_t, kCodeBytes>(a.codes + p * kCodeBytes, a.aligned);
        const int64_t grp = a.narrow ? static_cast<int64_t>(static_cast<uint32_t>(p) /
                                                            static_cast<uint32_t>(a.packs_per_group))
                                     : p / a.packs_per_group;
        sc[u] = a.scales[grp];
        ze[u] = a.zeros[grp];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = p0 + u * stride;
      if (p < a.packs) {
        OS r[E];
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const uint32_t b = cp[u].v[BITS == 8 ? e : e >> 1];
          const uint32_t code = BITS == 8 ? b : ((e & 1) ? (b >> 4) : (b & 0x0Fu));
          r[e] = Out<O>::from(qmath::decode(code, sc[u], ze[u]));
        }
        OS* dst = out + p * E;  // aligned: fresh allocation, p * E a multiple of kOutVec
#pragma unroll
        for (int j = 0; j < E; j += kOutVec) {
          OPack op;
#pragma unroll
          for (int i = 0; i < kOutVec; ++i) op.v[i] = r[j + i];
          *reinterpret_cast<OPack*>(dst + j) = op;
        }
      }
    }
  }
}

template <typename O, int BITS, int E>
void launch_dequantize(const DequantArgs& a, int device, cudaStream_t stream) {
  const int64_t max_blocks = static_cast<int64_t>(sm_count(device)) * (2048 / kThreads) * 4;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(a.packs, kThreads), max_blocks));
  dequantize_kernel<O, BITS, E><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename O, int BITS>
void launch_dequantize_vec(int e, const DequantArgs& a, int device, cudaStream_t stream) {
  switch (e) {
    case 16:
      return launch_dequantize<O, BITS, 16>(a, device, stream);
    case 4:
      return launch_dequantize<O, BITS, 4>(a, device, stream);
    default:
      return launch_dequantize<O, BITS, (BITS == 8 ? 1 : 2)>(a, device, stream);
  }
}

template <typename O>
void dequantize_groups(int bits, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t g, at::Tensor& out) {
  // Values per pack: 16 (one 16-byte INT8 / 8-byte INT4 load), else 4, else one code (two for INT4).
  const int e = g % 16 == 0 ? 16 : (g % 4 == 0 ? 4 : (bits == 8 ? 1 : 2));
  DequantArgs a{};
  a.codes = codes.const_data_ptr<uint8_t>();
  a.scales = scales.const_data_ptr<float>();
  a.zeros = zeros.const_data_ptr<float>();
  a.out = out.data_ptr();
  a.packs = out.numel() / e;
  a.packs_per_group = g / e;
  a.aligned = reinterpret_cast<uintptr_t>(a.codes) % static_cast<uintptr_t>(e * bits / 8) == 0;
  a.narrow = a.packs <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = codes.get_device();
  if (bits == 8) {
    launch_dequantize_vec<O, 8>(e, a, device, stream);
  } else {
    launch_dequantize_vec<O, 4>(e, a, device, stream);
  }
}

// codes: (*, n * bits / 8) uint8, scales/zeros: (*, groups) fp32, all CUDA -> (*, n) of `dtype`.
at::Tensor dequantize_cuda(const char* op, int bits, const at::Tensor& codes, const at::Tensor& scales,
                           const at::Tensor& zeros, at::ScalarType dtype) {
  const int64_t n = check_dequantize(op, bits, codes, scales, zeros, dtype, at::kCUDA);
  const int64_t groups = scales.size(-1);

  const c10::cuda::CUDAGuard guard(codes.device());
  auto out_shape = codes.sizes().vec();
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, codes.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const int64_t g = n / groups;
  if (dtype == at::kFloat) {
    dequantize_groups<float>(bits, codes, scales, zeros, g, out);
  } else if (dtype == at::kBFloat16) {
    dequantize_groups<at::BFloat16>(bits, codes, scales, zeros, g, out);
  } else {
    dequantize_groups<at::Half>(bits, codes, scales, zeros, g, out);
  }
  return out;
}

at::Tensor dequantize_int8_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                                at::ScalarType dtype) {
  return dequantize_cuda("dequantize_int8", 8, codes, scales, zeros, dtype);
}

at::Tensor dequantize_int4_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                                at::ScalarType dtype) {
  return dequantize_cuda("dequantize_int4", 4, codes, scales, zeros, dtype);
}

// ---------------------------------------------------------------------------------------------
// fp32 -> bf16 stochastic rounding
// ---------------------------------------------------------------------------------------------

// out[i] = bf16 bits of (bits(x[i]) + (word(offset + i) >> 16)) >> 16; NaN -> its top half
// with the quiet bit set (qmath::round_bf16_sr). x: (numel,) fp32, out: (numel,) bf16 bits.
// `aligned`: x 16-byte aligned, so packs of 4 values go as one 16-byte load and one 8-byte store;
// the tail (or everything, when not aligned) one value at a time. Grid-stride loops.
__global__ void __launch_bounds__(kThreads) round_bf16_kernel(const float* __restrict__ x, uint16_t* __restrict__ out,
                                                              int64_t numel, uint64_t seed, uint64_t offset,
                                                              bool aligned) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t quads = aligned ? numel / 4 : 0;
  for (int64_t q = tid; q < quads; q += stride) {
    const Pack<float, 4> v = *reinterpret_cast<const Pack<float, 4>*>(x + 4 * q);
    Pack<uint16_t, 4> r;
    uint32_t words[4];
    philox_run(seed, offset + static_cast<uint64_t>(4 * q), words);
#pragma unroll
    for (int e = 0; e < 4; ++e) r.v[e] = qmath::round_bf16_sr(v.v[e], words[e]);
    *reinterpret_cast<Pack<uint16_t, 4>*>(out + 4 * q) = r;
  }
  for (int64_t i = 4 * quads + tid; i < numel; i += stride) {
    out[i] = qmath::round_bf16_sr(x[i], philox_uint32(seed, offset + static_cast<uint64_t>(i)));
  }
}

// x: (*) float32, contiguous, CUDA -> (*) bfloat16.
at::Tensor round_bf16_stochastic_cuda(const at::Tensor& x, int64_t seed, int64_t offset) {
  check_round_bf16("round_bf16_stochastic", x, seed, offset, at::kCUDA);
  const int64_t numel = x.numel();
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  if (numel == 0) return out;
  const float* src = x.const_data_ptr<float>();
  const bool aligned = reinterpret_cast<uintptr_t>(src) % 16 == 0;
  const int64_t work = aligned ? ceil_div(numel, 4) : numel;
  const int64_t max_blocks = static_cast<int64_t>(sm_count(x.get_device())) * (2048 / kThreads) * 4;
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(work, kThreads), max_blocks));
  round_bf16_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src, reinterpret_cast<uint16_t*>(out.data_ptr()), numel, static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset), aligned);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgrad, CUDA, m) {
  m.impl("quantize_int8", &quantize_int8_cuda);
  m.impl("dequantize_int8", &dequantize_int8_cuda);
  m.impl("quantize_int4", &quantize_int4_cuda);
  m.impl("dequantize_int4", &dequantize_int4_cuda);
  m.impl("round_bf16_stochastic", &round_bf16_stochastic_cuda);
}

}  // namespace fastgrad
