// Host harness for tests/test_cuda_math.py: runs the FASTGRAD_HD device math of the CUDA kernels
// (csrc/common/quant_math.h, csrc/common/philox.h) on the CPU, in the order the kernels of
// csrc/cuda/quant.cu apply it, so that Python can compare the results with fastgrad/_reference.py.
// Built with g++ -ffp-contract=off (plain IEEE fp32 operators stand in for the __f*_rn intrinsics).
//
//   harness quant BITS SYM SR SEED OFFSET GROUPS G TPG VEC SPLITS IN_KIND IN OUT
//     IN: GROUPS*G values, fp32 (IN_KIND 0) or bf16 bit patterns (IN_KIND 1).
//     Statistics as the quantize kernels gather them: lane l of a team of TPG threads (warp
//     kernel: TPG <= 32; block kernel: TPG = 256) folds packs l, l + TPG, ... of VEC values of each
//     of SPLITS slices; lanes merge as the kernels do (xor butterfly within 32 lanes, then the
//     warps' partials in order), slices merge as the block kernel's mode 2 does.
//     OUT: codes (GROUPS*G*BITS/8 bytes, INT4 packed), scales (GROUPS fp32), zeros (GROUPS fp32),
//          dequantized fp32 (GROUPS*G), dequantized bf16 bits (GROUPS*G uint16).
//   harness round SEED OFFSET IN OUT     IN: fp32 values -> OUT: bf16 bit patterns (uint16)
//   harness philox SEED OFFSET N OUT     OUT: N uint32 words of stream positions OFFSET + i, drawn
//                                        by philox_run in runs of 8 (as the CUDA kernels draw packs)
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/philox.h"
#include "common/quant_math.h"

using fastgrad::qmath::Stats;
namespace qm = fastgrad::qmath;

namespace {

std::vector<unsigned char> read_file(const char* path) {
  std::vector<unsigned char> buf;
  FILE* f = std::fopen(path, "rb");
  if (!f) {
    std::perror(path);
    std::exit(2);
  }
  unsigned char tmp[1 << 16];
  size_t got;
  while ((got = std::fread(tmp, 1, sizeof(tmp), f)) > 0) buf.insert(buf.end(), tmp, tmp + got);
  std::fclose(f);
  return buf;
}

void write_all(FILE* f, const void* data, size_t bytes) {
  if (bytes && std::fwrite(data, 1, bytes, f) != bytes) {
    std::perror("fwrite");
    std::exit(2);
  }
}

uint64_t arg_u64(const char* s) { return std::strtoull(s, nullptr, 10); }
int64_t arg_i64(const char* s) { return std::strtoll(s, nullptr, 10); }

// The shuffle butterfly / block_reduce of csrc/cuda/quant.cu, seen from lane 0 (all lanes agree
// but for the sign of a zero).
Stats team_reduce(std::vector<Stats> lane, int tpg) {
  const int width = tpg < 32 ? tpg : 32;
  for (int off = width >> 1; off > 0; off >>= 1) {
    std::vector<Stats> next(lane);
    for (int l = 0; l < tpg; ++l) qm::stats_merge(next[l], lane[l ^ off]);
    lane.swap(next);
  }
  Stats s = lane[0];
  for (int w = 1; w < tpg / 32; ++w) qm::stats_merge(s, lane[32 * w]);
  return s;
}

int quant(char** argv) {
  const int bits = static_cast<int>(arg_i64(argv[0]));
  const bool sym = arg_i64(argv[1]) != 0, sr = arg_i64(argv[2]) != 0;
  const uint64_t seed = arg_u64(argv[3]), offset = arg_u64(argv[4]);
  const int64_t groups = arg_i64(argv[5]), g = arg_i64(argv[6]);
  const int tpg = static_cast<int>(arg_i64(argv[7])), vec = static_cast<int>(arg_i64(argv[8]));
  const int64_t splits = arg_i64(argv[9]);
  const int in_kind = static_cast<int>(arg_i64(argv[10]));
  const std::vector<unsigned char> raw = read_file(argv[11]);
  const int64_t numel = groups * g;
  std::vector<float> x(numel);
  if (in_kind == 0) {
    if (raw.size() != static_cast<size_t>(numel) * 4) return 3;
    std::memcpy(x.data(), raw.data(), raw.size());
  } else {
    if (raw.size() != static_cast<size_t>(numel) * 2) return 3;
    for (int64_t i = 0; i < numel; ++i) {
      uint16_t h;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      x[i] = qm::bf16_bits_to_float(h);
    }
  }
  if (g % vec != 0 || (bits == 4 && vec % 2 != 0)) return 4;
  const int64_t vecs = g / vec;
  const int64_t split_vecs = (vecs + splits - 1) / splits;
  const float qmax = static_cast<float>((1 << bits) - 1);

  std::vector<uint8_t> codes(numel * bits / 8, 0);
  std::vector<float> scales(groups), zeros(groups), deq(numel);
  std::vector<uint16_t> deq_bf16(numel);
  for (int64_t grp = 0; grp < groups; ++grp) {
    const float* xg = x.data() + grp * g;
    Stats st = qm::stats_init(sym);
    for (int64_t s = 0; s * split_vecs < vecs; ++s) {  // mode 1 per slice, then mode 2's merge
      std::vector<Stats> lane(tpg, qm::stats_init(sym));
      const int64_t vb = s * split_vecs, ve = std::min(vb + split_vecs, vecs);
      for (int64_t v = vb; v < ve; ++v) {
        for (int e = 0; e < vec; ++e) qm::stats_add(lane[(v - vb) % tpg], xg[v * vec + e], sym);
      }
      qm::stats_merge(st, team_reduce(lane, tpg));
    }
    const qm::Affine af = qm::group_affine(st, bits, sym);
    scales[grp] = af.scale;
    zeros[grp] = af.zero;
    for (int64_t j = 0; j < g; ++j) {
      const int64_t i = grp * g + j;
      const float xi = sr ? fastgrad::philox_uniform(seed, offset + static_cast<uint64_t>(i)) : 0.0f;
      const uint32_t c = qm::encode(xg[j], af, qmax, sr, xi);
      if (bits == 8) {
        codes[i] = static_cast<uint8_t>(c);
      } else {
        // pack_nibbles(even, odd): build the byte from its two codes as the kernel does.
        const uint32_t prev = codes[i / 2];
        codes[i / 2] = static_cast<uint8_t>((i & 1) ? qm::pack_nibbles(prev & 0x0Fu, c) : qm::pack_nibbles(c, 0));
      }
    }
  }
  // Decode what was encoded, as dequantize_kernel does (nibble 2j low, 2j+1 high).
  for (int64_t i = 0; i < numel; ++i) {
    const int64_t grp = i / g;
    const uint32_t b = bits == 8 ? codes[i] : codes[i / 2];
    const uint32_t c = bits == 8 ? b : ((i & 1) ? (b >> 4) : (b & 0x0Fu));
    deq[i] = qm::decode(c, scales[grp], zeros[grp]);
    deq_bf16[i] = qm::float_to_bf16_rne(deq[i]);
  }
  FILE* f = std::fopen(argv[12], "wb");
  if (!f) return 2;
  write_all(f, codes.data(), codes.size());
  write_all(f, scales.data(), scales.size() * 4);
  write_all(f, zeros.data(), zeros.size() * 4);
  write_all(f, deq.data(), deq.size() * 4);
  write_all(f, deq_bf16.data(), deq_bf16.size() * 2);
  std::fclose(f);
  return 0;
}

int round_bf16(char** argv) {
  const uint64_t seed = arg_u64(argv[0]), offset = arg_u64(argv[1]);
  const std::vector<unsigned char> raw = read_file(argv[2]);
  const size_t n = raw.size() / 4;
  std::vector<uint16_t> out(n);
  for (size_t i = 0; i < n; ++i) {
    float v;
    std::memcpy(&v, raw.data() + 4 * i, 4);
    out[i] = qm::round_bf16_sr(v, fastgrad::philox_uint32(seed, offset + i));
  }
  FILE* f = std::fopen(argv[3], "wb");
  if (!f) return 2;
  write_all(f, out.data(), out.size() * 2);
  std::fclose(f);
  return 0;
}

int philox(char** argv) {
  const uint64_t seed = arg_u64(argv[0]), offset = arg_u64(argv[1]);
  const int64_t n = arg_i64(argv[2]);
  std::vector<uint32_t> out(n);
  for (int64_t i = 0; i < n; i += 8) {
    uint32_t run[8];
    fastgrad::philox_run(seed, offset + static_cast<uint64_t>(i), run);
    for (int64_t e = 0; e < 8 && i + e < n; ++e) out[i + e] = run[e];
  }
  FILE* f = std::fopen(argv[3], "wb");
  if (!f) return 2;
  write_all(f, out.data(), out.size() * 4);
  std::fclose(f);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2) {
    const std::string cmd = argv[1];
    if (cmd == "quant" && argc == 15) return quant(argv + 2);
    if (cmd == "round" && argc == 6) return round_bf16(argv + 2);
    if (cmd == "philox" && argc == 6) return philox(argv + 2);
  }
  std::fprintf(stderr, "usage: see the comment at the top of cuda_math_harness.cpp\n");
  return 1;
}
