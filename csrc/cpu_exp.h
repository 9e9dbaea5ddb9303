// Vectorisable exp for the CPU kernels (sparse_attention_cpu.cpp, sample_scores_cpu.cpp): std::exp does not
// vectorise without -ffast-math, these inline polynomials do.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

// The core of exp(z) for z in [-87, 0] on a float or a GCC float vector (vec16.h): sets n = round(z / ln 2) (a
// whole number, as V) and returns exp(z) / 2^n by Cody-Waite reduction and a degree-7 polynomial (relative error
// about 1e-7); the caller scales by 2^n.
template <typename V>
inline V exp_reduced(V z, V& n) {
  n = (z * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (z - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// exp(y) for y <= 0 (0 below -87), inline so that the loops calling it vectorise.
inline float exp_nonpositive(float y) {
  float n;
  const float p = exp_reduced(std::max(y, -87.0f), n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return y < -87.0f ? 0.0f : p * scale;
}

// x[i] = exp(x[i] - shift) for n values, -inf giving 0; returns their sum.
inline float exp_shifted_sum(float* x, int64_t n, float shift) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_nonpositive(x[i] - shift);
    x[i] = e;
    total += e;
  }
  return total;
}
