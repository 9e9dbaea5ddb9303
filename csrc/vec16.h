// 16-lane float vectors as GCC vector extensions for the CPU passes (sample_reduce.h, sample_scores_cpu.cpp): one
// AVX-512 register where the compiler targets it, two AVX2 halves (or scalar code) elsewhere, the same source.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_exp.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The vectors live in inline functions only: no ABI between objects to keep stable.
#pragma GCC diagnostic ignored "-Wpsabi"

// Lane shuffle of two vectors by constant indices (0-15: a's lanes, 16-31: b's): GCC before 12 lacks
// __builtin_shufflevector and has __builtin_shuffle instead.
#if defined(__clang__) || __GNUC__ >= 12
#define VEC16_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define VEC16_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, ::vec16::v16i{__VA_ARGS__})
#endif

namespace vec16 {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
// Rows held as vectors by the passes that keep a key's rows in registers: up to 128 sample rows.
constexpr int kMaxRowVectors = 8;

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 splat(float x) { return v16{} + x; }
inline v16 max(v16 a, v16 b) { return a > b ? a : b; }

// exp(y) lane by lane for y <= 0 (0 below -87, and for -inf): cpu_exp.h's exp_nonpositive on vectors, so the loops
// calling it need no masks.
inline v16 exp_nonpositive(v16 y) {
  v16 n;
  const v16 p = exp_reduced(y < -87.0f ? splat(-87.0f) : y, n);
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y < -87.0f ? v16{} : p * scale;
}

// fp16 storage (values in [0, 1] kept between the sample pass's two passes): where the compiler targets AVX-512,
// whose conversions take 16 lanes in one instruction.
#if defined(__AVX512F__)
#define VEC16_HALF 1
inline v16 load(const uint16_t* p) {
  return (v16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store(uint16_t* p, v16 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
#define VEC16_HALF 0
#endif

// dst[0, n) = src[0, n) between float and fp16 storage (or float to float).
template <typename From, typename To>
inline void convert(const From* src, To* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store(dst + i, load(src + i));
  if (i < n) {
    From in[16] = {};
    To got[16];
    std::memcpy(in, src + i, (n - i) * sizeof(From));
    store(got, load(in));
    std::memcpy(dst + i, got, (n - i) * sizeof(To));
  }
}

}  // namespace vec16
