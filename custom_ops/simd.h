// Helpers for loops the compiler vectorizes: an exp it can inline into a SIMD loop, and a macro
// that builds a function once per instruction set and picks one at load time.
#pragma once

#include <cstdint>
#include <cstring>

// The build uses the compiler's default target (plain x86-64 / SSE2), so that one build runs on
// any machine of the cluster; target_clones adds AVX2 and AVX-512 versions of the hot loops and
// the dynamic loader picks the best one the CPU has (an ifunc). ATen's own vector kernels are
// dispatched the same way, but their headers select one instruction set per translation unit.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GPT2IPU_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GPT2IPU_SIMD_CLONES
#endif

namespace gpt2ipu {

// exp(x) for x <= 0 (every call here subtracts a running max first), relative error about 2e-7.
// std::exp would be a library call per element, which stops vectorization (about 10x slower).
// Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n through
// the float's exponent bits. Inputs below -87.3 (and -inf) give about 1e-38 instead of 0 (the
// smallest normal float): always multiplied by a zero or added to a sum of at least 1.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < -87.33654f ? -87.33654f : x;  // also maps -inf; NaN stays NaN
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

}  // namespace gpt2ipu
