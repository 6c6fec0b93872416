// Row dot products for decoding: y[r] = W[r] . x for the rows r of one thread's share, with W
// in fp32, bf16, or int8 with one fp32 scale per row, in PyTorch's own [out, in] layout.
//
// Why by hand: at one token per step every weight is read once per token, so decoding runs at
// the speed the weights stream from memory, and the loops must keep up with it. Two things
// decide that, both measured on GPT-2 small's matrices (docs/measurements.md):
//   * One row at a time, so each thread reads one sequential stream. Four rows at once (four
//     streams 768 bytes apart that end after 12 cache lines) defeated the hardware prefetcher:
//     int8 streamed at 15 GB/s that way, 31-45 GB/s row by row.
//   * Few instructions per byte. Widening int8 to fp32 costs four instructions per 16 weights,
//     which caps it near 20 GB/s on two cores, so int8 rows use AVX512-VNNI's vpdpbusd (64
//     multiply-adds per instruction) against x quantized to int8 per block of 64 (absmax / 127,
//     as llama.cpp's q8_0 does per 32), and sum each block exactly in int32. bf16 rows widen by a
//     shift (two instructions per 32 weights) against x held in the order those shifts produce,
//     so their sums are fp32's over the rounded weights.
// Each format has a portable loop the compiler vectorizes for machines without AVX-512; the
// int8 one computes the same integer block sums, so the numbers do not depend on the machine
// beyond the order of the fp32 additions.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define GPT2IPU_X86 1
#else
#define GPT2IPU_X86 0
#endif

namespace gpt2ipu::matvec {

constexpr int64_t kQuantBlock = 64;  // x values per int8 scale (one vpdpbusd)
constexpr int64_t kBf16Chunk = 32;   // bf16 weights per 64-byte load

enum class Format { kFp32, kBf16, kInt8 };

// Which instructions this CPU gives each format (probed once).
struct Isa {
  bool avx512 = false;  // avx512f + avx512bw
  bool vnni = false;    // avx512_vnni on top
};
inline Isa probe_isa() {
  Isa isa;
#if GPT2IPU_X86
  isa.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  isa.vnni = isa.avx512 && __builtin_cpu_supports("avx512vnni");
#endif
  return isa;
}
inline const Isa& isa() {
  static const Isa probed = probe_isa();
  return probed;
}

// One row of x as a format's loops read it. fp32: x itself. bf16: each full chunk of 32 values
// reordered evens first, then odds (the order in which a shift and a mask widen 32 packed bf16
// weights), the tail as it is. int8: x quantized per block of 64, with each block's scale and,
// per 32-bit lane of the block, 128 x the sum of that lane's four quantized values (what the
// unsigned-times-signed vpdpbusd adds when the weights are offset by 128).
struct PreparedX {
  int64_t in = 0;
  std::vector<float> values;    // fp32, bf16
  std::vector<int8_t> quant;    // int8: padded to whole blocks with zeros
  std::vector<float> scales;    // int8: one per block
  std::vector<int32_t> offset;  // int8: 16 per block

  void prepare(const float* x, int64_t n, Format format) {
    in = n;
    if (format == Format::kInt8) return quantize(x, n);
    values.assign(x, x + n);
    if (format != Format::kBf16) return;
    for (int64_t c = 0; c + kBf16Chunk <= n; c += kBf16Chunk)
      for (int64_t j = 0; j < kBf16Chunk / 2; ++j) {
        values[c + j] = x[c + 2 * j];
        values[c + kBf16Chunk / 2 + j] = x[c + 2 * j + 1];
      }
  }

 private:
  void quantize(const float* x, int64_t n);
};

// Block `x[0 .. n)` (n <= 64) to int8: its scale, values and per-lane offsets (see PreparedX).
// Rounds half to even, as std::nearbyint and torch.round do, by the float trick
// (v + 1.5 * 2^23) - 1.5 * 2^23 so that the loop vectorizes.
GPT2IPU_SIMD_CLONES static float quantize_block(const float* x, int64_t n, int8_t* quant, int32_t* offset) {
  float absmax = 0.f;
#pragma omp simd reduction(max : absmax)
  for (int64_t i = 0; i < n; ++i) absmax = std::max(absmax, std::fabs(x[i]));
  if (absmax == 0.f) {  // a zero block: scale 0, values 0
    std::fill(offset, offset + 16, 0);
    return 0.f;
  }
  const float inverse = 127.f / absmax;
  constexpr float kRound = 12582912.f;
  int32_t values[kQuantBlock] = {};
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = (x[i] * inverse + kRound) - kRound;
    values[i] = static_cast<int32_t>(std::min(127.f, std::max(-127.f, v)));
  }
  for (int64_t i = 0; i < n; ++i) quant[i] = static_cast<int8_t>(values[i]);
  for (int64_t lane = 0; lane < 16; ++lane)
    offset[lane] = 128 * (values[4 * lane] + values[4 * lane + 1] + values[4 * lane + 2] + values[4 * lane + 3]);
  return absmax / 127.f;
}

inline void PreparedX::quantize(const float* x, int64_t n) {
  const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
  quant.assign(blocks * kQuantBlock, 0);
  scales.resize(blocks);
  offset.resize(blocks * 16);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kQuantBlock;
    scales[b] = quantize_block(x + start, std::min(kQuantBlock, n - start), quant.data() + start, offset.data() + b * 16);
  }
}

// ---- portable loops (the compiler vectorizes them; used without AVX-512 and for tails) ----

inline float bf16_to_float(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float dot_fp32_plain(const float* w, const float* x, int64_t begin, int64_t end) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = begin; i < end; ++i) s += w[i] * x[i];
  return s;
}

// bf16 weights against x in natural order (the tail of a prepared row, or a plain x).
inline float dot_bf16_plain(const uint16_t* w, const float* x, int64_t begin, int64_t end) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = begin; i < end; ++i) s += bf16_to_float(w[i]) * x[i];
  return s;
}

// int8 weights against quantized x, block `b` of a prepared row: the exact integer sum.
inline int32_t block_int8_plain(const int8_t* w, const PreparedX& x, int64_t b) {
  const int64_t start = b * kQuantBlock, stop = std::min(x.in, start + kQuantBlock);
  int32_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = start; i < stop; ++i) s += static_cast<int32_t>(w[i]) * static_cast<int32_t>(x.quant[i]);
  return s;
}

inline float dot_plain(const float* w, const PreparedX& x) { return dot_fp32_plain(w, x.values.data(), 0, x.in); }

inline float dot_plain(const uint16_t* w, const PreparedX& x) {
  const int64_t full = x.in - x.in % kBf16Chunk;
  float s = 0.f;
  for (int64_t c = 0; c < full; c += kBf16Chunk) {  // undo the evens-then-odds order
    const float* xc = x.values.data() + c;
    for (int64_t j = 0; j < kBf16Chunk / 2; ++j)
      s += bf16_to_float(w[c + 2 * j]) * xc[j] + bf16_to_float(w[c + 2 * j + 1]) * xc[kBf16Chunk / 2 + j];
  }
  return s + dot_bf16_plain(w, x.values.data(), full, x.in);
}

inline float dot_plain(const int8_t* w, const PreparedX& x) {
  float s = 0.f;
  for (int64_t b = 0; b < static_cast<int64_t>(x.scales.size()); ++b)
    s += static_cast<float>(block_int8_plain(w, x, b)) * x.scales[b];
  return s;
}

#if GPT2IPU_X86
// ---- AVX-512 loops: one row, four (fp32, bf16) or two (int8) accumulators ----

__attribute__((target("avx512f,avx512bw"))) inline float dot_avx512(const float* w, const PreparedX& x) {
  const float* xv = x.values.data();
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= x.in; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(xv + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(xv + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(xv + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(xv + i + 48), a3);
  }
  for (; i + 16 <= x.in; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(xv + i), a0);
  const float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  return s + dot_fp32_plain(w, xv, i, x.in);
}

__attribute__((target("avx512f,avx512bw"))) inline float dot_avx512(const uint16_t* w, const PreparedX& x) {
  const float* xv = x.values.data();
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 2 * kBf16Chunk <= x.in; i += 2 * kBf16Chunk) {
    const __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + kBf16Chunk);
    // Each 32-bit lane holds two bf16: the even one in the low half (shift it up), the odd one
    // in the high half (mask the low half off); x is stored evens-then-odds to match.
    a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), _mm512_loadu_ps(xv + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w0, high)), _mm512_loadu_ps(xv + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), _mm512_loadu_ps(xv + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w1, high)), _mm512_loadu_ps(xv + i + 48), a3);
  }
  for (; i + kBf16Chunk <= x.in; i += kBf16Chunk) {
    const __m512i w0 = _mm512_loadu_si512(w + i);
    a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), _mm512_loadu_ps(xv + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w0, high)), _mm512_loadu_ps(xv + i + 16), a1);
  }
  const float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  return s + dot_bf16_plain(w, xv, i, x.in);
}

// Blocks of 64: vpdpbusd multiplies unsigned by signed bytes, so the weights go in as w + 128
// (an xor of the sign bit) and each lane's 128 x sum(q) comes off again: exact int32 sums.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline float dot_vnni(const int8_t* w, const PreparedX& x) {
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t full = x.in / kQuantBlock;
  const int8_t* q = x.quant.data();
  const int32_t* off = x.offset.data();
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  int64_t b = 0;
  for (; b + 2 <= full; b += 2) {
    const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(w + b * kQuantBlock), sign);
    const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(w + (b + 1) * kQuantBlock), sign);
    __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(q + b * kQuantBlock));
    __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(q + (b + 1) * kQuantBlock));
    s0 = _mm512_sub_epi32(s0, _mm512_loadu_si512(off + b * 16));
    s1 = _mm512_sub_epi32(s1, _mm512_loadu_si512(off + (b + 1) * 16));
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_set1_ps(x.scales[b]), a0);
    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(x.scales[b + 1]), a1);
  }
  for (; b < full; ++b) {
    const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(w + b * kQuantBlock), sign);
    __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(q + b * kQuantBlock));
    s0 = _mm512_sub_epi32(s0, _mm512_loadu_si512(off + b * 16));
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_set1_ps(x.scales[b]), a0);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  if (full * kQuantBlock < x.in) s += static_cast<float>(block_int8_plain(w, x, full)) * x.scales[full];
  return s;
}
#endif

// Prefetch, into L2, the cache lines kPrefetchBytes past the row about to be read. The hardware
// prefetcher alone kept about 20 GB/s per core in flight here, against 27 for a plain sum;
// asking 16 KB ahead took one core to 23-33 GB/s and two to 58-62 (GPT-2's int8 LM head,
// docs/measurements.md). A prefetch past the end of the matrix is harmless: it never faults.
constexpr int64_t kPrefetchBytes = 16 * 1024;
inline void prefetch_ahead(const void* row, int64_t bytes) {
  const char* ahead = static_cast<const char*>(row) + kPrefetchBytes;
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(ahead + offset, 0, 2);
}

// The portable loops over a range of rows, built once per instruction set (simd.h).
#define GPT2IPU_PLAIN_ROWS(W)                                                                            \
  GPT2IPU_SIMD_CLONES static void rows_plain(const W* weight, const PreparedX& x, float* y, int64_t stride, \
                                             int64_t begin, int64_t end) {                                \
    for (int64_t r = begin; r < end; ++r) {                                                              \
      prefetch_ahead(weight + r * x.in, x.in * int64_t(sizeof(W)));                                     \
      y[r * stride] = dot_plain(weight + r * x.in, x);                                                   \
    }                                                                                                    \
  }
GPT2IPU_PLAIN_ROWS(float)
GPT2IPU_PLAIN_ROWS(uint16_t)
GPT2IPU_PLAIN_ROWS(int8_t)
#undef GPT2IPU_PLAIN_ROWS

// y[r * stride] = W[r] . x for r in [begin, end), by the loop this CPU has.
template <typename W>
void dot_rows(const W* weight, const PreparedX& x, float* y, int64_t stride, int64_t begin, int64_t end) {
#if GPT2IPU_X86
  const int64_t in = x.in, row_bytes = in * int64_t(sizeof(W));
  if constexpr (std::is_same_v<W, int8_t>) {
    if (isa().vnni) {
      for (int64_t r = begin; r < end; ++r) {
        prefetch_ahead(weight + r * in, row_bytes);
        y[r * stride] = dot_vnni(weight + r * in, x);
      }
      return;
    }
  } else {
    if (isa().avx512) {
      for (int64_t r = begin; r < end; ++r) {
        prefetch_ahead(weight + r * in, row_bytes);
        y[r * stride] = dot_avx512(weight + r * in, x);
      }
      return;
    }
  }
#endif
  rows_plain(weight, x, y, stride, begin, end);
}

template <typename W>
constexpr Format format_of() {
  if constexpr (std::is_same_v<W, float>) return Format::kFp32;
  if constexpr (std::is_same_v<W, uint16_t>) return Format::kBf16;
  return Format::kInt8;
}

// What the probe chose, for `decode_kernels()`.
inline const char* kernels_report() {
  const Isa& probed = isa();
  if (probed.vnni) return "fp32 avx512f fma; bf16 avx512f shift-widen + fma; int8 avx512_vnni vpdpbusd (x int8 per 64)";
  if (probed.avx512)
    return "fp32 avx512f fma; bf16 avx512f shift-widen + fma; int8 portable integer loop (x int8 per 64; no VNNI)";
  return "portable compiler-vectorized loops (no AVX-512): fp32, bf16 widen, int8 integer blocks (x int8 per 64)";
}

}  // namespace gpt2ipu::matvec
