// y = x W^T + b for the few rows of x that decoding feeds (one per sequence of the batch): the
// matrix-vector products of `gpt2ipu generate`, in the weights' own [out, in] layout.
//
// Why by hand: at one token per step every weight matrix is read once per token and used for a
// handful of multiply-adds per element, so decoding runs at the speed the weights stream from
// memory. MKL's sgemv (what F.linear calls for one row) reaches about 18 GB/s here, 25-27 GB/s in
// the [in, out] layout, against 45 GB/s for a plain sum over the same bytes. This loop streams
// four weight rows at a time against every x row (the x rows stay in L1, so the weights are read
// from memory once whatever the number of rows), split over ATen's threads by output rows: about
// 45-54 GB/s, which is 2x the tokens per second of GPT-2 small decoding on CPU.
//
// Past that limit only fewer bytes per token go faster: `decode_linear_bf16` reads bf16 weights
// (2 bytes) and `decode_linear_int8` int8 weights with one fp32 scale per output row (1 byte,
// weight-only quantization). Both widen each weight to fp32 in the loop (bf16: a 16-bit shift;
// int8: a sign-extend and convert) and multiply-add in fp32 against the fp32 x, so the sums are
// as exact as fp32's over the rounded weights; the arithmetic is free beside the memory traffic.
// AVX512-BF16's dot product (vdpbf16ps) would also round x to bf16: no faster here, less exact.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define GPT2IPU_X86_DISPATCH 1
#else
#define GPT2IPU_X86_DISPATCH 0
#endif

#include "simd.h"

namespace {

constexpr int64_t kMaxRows = 16;      // more rows than this is a matrix product: F.linear's job
constexpr int64_t kRowsPerBlock = 4;  // weight rows streamed together (4 x in floats: in L1)

// A weight element as fp32: the loops below are written once over the element type, and these
// inline into each instruction-set clone (so they vectorize with it).
inline float widen(float w) { return w; }
inline float widen(uint16_t w) {  // bf16: the top half of an fp32
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(int8_t w) { return static_cast<float>(w); }

// y[m, o0 .. o0 + 3] = x[m] . W[o0 .. o0 + 3] for every row m of x.
template <typename W>
__attribute__((always_inline)) inline void dot_four_rows(const W* w, int64_t in, const float* x, int64_t rows,
                                                         float* y, int64_t out) {
  const W* w0 = w;
  const W* w1 = w + in;
  const W* w2 = w + 2 * in;
  const W* w3 = w + 3 * in;
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * in;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < in; ++i) {
      s0 += widen(w0[i]) * xm[i];
      s1 += widen(w1[i]) * xm[i];
      s2 += widen(w2[i]) * xm[i];
      s3 += widen(w3[i]) * xm[i];
    }
    float* ym = y + m * out;
    ym[0] = s0;
    ym[1] = s1;
    ym[2] = s2;
    ym[3] = s3;
  }
}

template <typename W>
__attribute__((always_inline)) inline void dot_one_row(const W* w, int64_t in, const float* x, int64_t rows,
                                                       float* y, int64_t out) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * in;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < in; ++i) s += widen(w[i]) * xm[i];
    y[m * out] = s;
  }
}

// Output rows [begin, end) of blocks of four: one clone per instruction set and weight type
// (target_clones does not apply to templates, so each type gets its own plain function).
template <typename W>
__attribute__((always_inline)) inline void dot_blocks(const W* wp, int64_t in, const float* xp, int64_t rows,
                                                      float* yp, int64_t out, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o = b * kRowsPerBlock;
    if (o + kRowsPerBlock <= out) {
      dot_four_rows(wp + o * in, in, xp, rows, yp + o, out);
    } else {
      for (int64_t r = o; r < out; ++r) dot_one_row(wp + r * in, in, xp, rows, yp + r, out);
    }
  }
}

#if GPT2IPU_X86_DISPATCH
// The bf16 and int8 loops by hand in AVX-512F: GCC vectorizes the widening loops above with
// 128-bit registers only (measured: int8 no faster than bf16), so these widen 16 weights per
// instruction: int8 by vpmovsxbd + vcvtdq2ps, bf16 by vpmovzxwd + a 16-bit shift.
__attribute__((target("avx512f"))) inline __m512 widen16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
__attribute__((target("avx512f"))) inline __m512 widen16(const uint16_t* w) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <typename W>
__attribute__((target("avx512f"))) void blocks_avx512(const W* wp, int64_t in, const float* xp, int64_t rows,
                                                      float* yp, int64_t out, int64_t begin, int64_t end) {
  const int64_t vec_end = in - in % 16;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o = b * kRowsPerBlock;
    if (o + kRowsPerBlock > out) {  // the last, partial block
      for (int64_t r = o; r < out; ++r) dot_one_row(wp + r * in, in, xp, rows, yp + r, out);
      continue;
    }
    const W* w0 = wp + o * in;
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = xp + m * in;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
             a3 = _mm512_setzero_ps();
      for (int64_t i = 0; i < vec_end; i += 16) {
        const __m512 xv = _mm512_loadu_ps(xm + i);
        a0 = _mm512_fmadd_ps(widen16(w0 + i), xv, a0);
        a1 = _mm512_fmadd_ps(widen16(w0 + in + i), xv, a1);
        a2 = _mm512_fmadd_ps(widen16(w0 + 2 * in + i), xv, a2);
        a3 = _mm512_fmadd_ps(widen16(w0 + 3 * in + i), xv, a3);
      }
      float s[kRowsPerBlock] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                _mm512_reduce_add_ps(a3)};
      for (int64_t i = vec_end; i < in; ++i)
        for (int64_t r = 0; r < kRowsPerBlock; ++r) s[r] += widen(w0[r * in + i]) * xm[i];
      float* ym = yp + m * out + o;
      for (int64_t r = 0; r < kRowsPerBlock; ++r) ym[r] = s[r];
    }
  }
}
#endif

// Which loops `decode_linear_bf16` / `_int8` run on this CPU (the Python probe reports it).
bool use_avx512() {
#if GPT2IPU_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

std::string decode_kernels() {
  return use_avx512() ? "avx512f widen+fma (bf16, int8)" : "compiler-vectorized widen+fma (bf16, int8)";
}

GPT2IPU_SIMD_CLONES void blocks_fp32(const float* w, int64_t in, const float* x, int64_t rows, float* y, int64_t out,
                                     int64_t begin, int64_t end) {
  dot_blocks(w, in, x, rows, y, out, begin, end);
}
GPT2IPU_SIMD_CLONES void blocks_bf16_any(const uint16_t* w, int64_t in, const float* x, int64_t rows, float* y,
                                         int64_t out, int64_t begin, int64_t end) {
  dot_blocks(w, in, x, rows, y, out, begin, end);
}
GPT2IPU_SIMD_CLONES void blocks_int8_any(const int8_t* w, int64_t in, const float* x, int64_t rows, float* y,
                                         int64_t out, int64_t begin, int64_t end) {
  dot_blocks(w, in, x, rows, y, out, begin, end);
}

template <typename W, typename Any>
void blocks_low(const W* w, int64_t in, const float* x, int64_t rows, float* y, int64_t out, int64_t begin,
                int64_t end, Any any) {
#if GPT2IPU_X86_DISPATCH
  if (use_avx512()) return blocks_avx512(w, in, x, rows, y, out, begin, end);
#endif
  any(w, in, x, rows, y, out, begin, end);
}
void blocks_bf16(const uint16_t* w, int64_t in, const float* x, int64_t rows, float* y, int64_t out, int64_t begin,
                 int64_t end) {
  blocks_low(w, in, x, rows, y, out, begin, end, blocks_bf16_any);
}
void blocks_int8(const int8_t* w, int64_t in, const float* x, int64_t rows, float* y, int64_t out, int64_t begin,
                 int64_t end) {
  blocks_low(w, in, x, rows, y, out, begin, end, blocks_int8_any);
}

void check_shapes(const char* op, const at::Tensor& x, const at::Tensor& weight, at::ScalarType weight_type) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == weight_type, op, ": float32 only for x ",
              "(weight ", weight_type, "), got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              op, ": need x [rows, in] and weight [out, in], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(0) <= kMaxRows, op, ": at most ", kMaxRows, " rows, got ", x.size(0));
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous [out, in]");
}

// y = x W^T for any weight type, through `blocks` (one of the functions above), split over
// ATen's threads by output rows.
template <typename W, typename Blocks>
at::Tensor run_blocks(const at::Tensor& x, const W* wp, int64_t out, Blocks blocks_fn) {
  const int64_t rows = x.size(0), in = x.size(1);
  const auto xc = x.contiguous();
  auto y = at::empty({rows, out}, x.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (out + kRowsPerBlock - 1) / kRowsPerBlock;
  // About 64 KB of fp32 weights' worth of rows per task at least, so small matrices do not pay
  // for waking threads.
  const int64_t grain = std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(1, kRowsPerBlock * in));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    blocks_fn(wp, in, xp, rows, yp, out, begin, end);
  });
  return y;
}

void add_bias(const char* op, at::Tensor& y, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == y.size(1), op, ": bias must be [out]");
    y.add_(bias->to(at::kFloat));
  }
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_shapes("decode_linear", x, weight, at::kFloat);
  auto y = run_blocks(x, weight.data_ptr<float>(), weight.size(0), blocks_fp32);
  add_bias("decode_linear", y, bias);
  return y;
}

at::Tensor decode_linear_bf16(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_shapes("decode_linear_bf16", x, weight, at::kBFloat16);
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  auto y = run_blocks(x, wp, weight.size(0), blocks_bf16);
  add_bias("decode_linear_bf16", y, bias);
  return y;
}

// weight int8 [out, in] and scale float32 [out]: y = (x W^T) * scale + b.
at::Tensor decode_linear_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& bias) {
  check_shapes("decode_linear_int8", x, weight, at::kChar);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == weight.size(0),
              "decode_linear_int8: scale must be float32 [out], got ", scale.scalar_type(), " ", scale.sizes());
  auto y = run_blocks(x, weight.data_ptr<int8_t>(), weight.size(0), blocks_int8);
  y.mul_(scale);
  add_bias("decode_linear_int8", y, bias);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2ipu, m) {
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_linear_int8(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("decode_kernels() -> str", &decode_kernels);
}

TORCH_LIBRARY_IMPL(gpt2ipu, CPU, m) {
  m.impl("decode_linear", &decode_linear);
  m.impl("decode_linear_bf16", &decode_linear_bf16);
  m.impl("decode_linear_int8", &decode_linear_int8);
}
