// fp32 -> bf16 (round to nearest even) for the CPU kernels that feed fp32 keys to bf16 GEMMs.  Where the compiler
// targets AVX512_BF16 (-march=native on such a CPU) the conversion is one instruction per 16 values
// (VCVTNEPS2BF16); elsewhere, or with native=false (the tests' switch), c10's rounding (about six vector integer ops
// per 16 values).  The two agree on every finite value except fp32 denormals, which the instruction turns into
// zeros of the same sign (|x| < 1.2e-38: nothing a score notices).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace bf16_convert {

// Whether `to_bf16` has the one-instruction path in this build.
constexpr bool kNative =
#if defined(__AVX512BF16__)
    true;
#else
    false;
#endif

inline void to_bf16_portable(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

// dst[i] = bf16(src[i]) for n values.
inline void to_bf16(const float* src, c10::BFloat16* dst, int64_t n, bool native = true) {
#if defined(__AVX512BF16__)
  if (native) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
      _mm512_storeu_si512(dst + i, reinterpret_cast<__m512i>(v));
    }
    for (; i < n; i += 16) {  // masked tail (at most two steps)
      const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
      _mm256_mask_storeu_epi16(dst + i, m, reinterpret_cast<__m256i>(h));
    }
    return;
  }
#endif
  to_bf16_portable(src, dst, n);
}

}  // namespace bf16_convert
