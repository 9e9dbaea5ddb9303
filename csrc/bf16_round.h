// fp32 -> bf16 rows for the CPU passes that run bf16 GEMMs on fp32 inputs (round to nearest even, as c10::BFloat16).
// One instruction per 16 values where the compiler targets AVX512-BF16 (the CPUs that take the bf16 GEMM route);
// elsewhere c10's conversion (about six vector instructions per 16 values).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

// dst[0, n) = src[0, n) in T (fp32: a copy).
template <typename T>
inline void round_row(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
