// Pass 2 of the fused sample-score pass (sample_scores_cpu.cpp): one key's probabilities over a head's n sample rows
// reduced to column mass, column mass off the local band, diagonal mass and column mass by diagonal group.
// Plain loops that GCC vectorises (the 16-lane sums).  Tried and dropped (measured at 32K, 8 heads, 2 cores): an
// AVX-512 version (masked vector sums, the diagonal mass in a sliding window of registers): 15-19 vs 13 ms for the
// pass; a tree for the lanes' final sum and the column as the sum of the group slots: no gain within the noise.
#pragma once

#include <algorithm>
#include <cstdint>


inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Sum of x[lo, hi) in 16 independent lanes (GCC vectorises this; it left `omp simd reduction` loops scalar).
inline float sum_range(const float* x, int64_t lo, int64_t hi) {
  float lane[16] = {};
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += x[i + l];
  float total = 0.f;
  for (; i < hi; ++i) total += x[i];
  for (int l = 0; l < 16; ++l) total += lane[l];
  return total;
}

// Where key j's outputs go, and the head's parameters.  d0 = pos0 - j: row r lies at distance d0 + r from key j.
struct KeyOut {
  float *column, *off_local, *diagonal, *by_group;  // [Lk], [Lk], [Lk], [Lk, G] of this head
  int64_t Lk, sink, local, group, G, pos0;
};

// Key j of one head: p[r] = s[r] * f[r] (r < n) are the rows' probabilities of key j (p: scratch of n floats).
inline void reduce_key(const float* s, const float* f, float* p, int64_t n, int64_t j, const KeyOut& o) {
  for (int64_t r = 0; r < n; ++r) p[r] = s[r] * f[r];
  const int64_t d0 = o.pos0 - j;
  const int64_t r_lo = std::clamp<int64_t>(-d0, 0, n);  // first row at distance >= 0
  const float col = sum_range(p, 0, n);
  const float near = sum_range(p, r_lo, std::max(r_lo, std::clamp<int64_t>(o.local - d0, 0, n)));
  o.column[j] = col;
  o.off_local[j] = col - near;
  if (j >= o.sink) {
    float* diag = o.diagonal + d0;
    const int64_t r_hi = std::clamp<int64_t>(o.Lk - d0, 0, n);
#pragma omp simd
    for (int64_t r = r_lo; r < r_hi; ++r) diag[r] += p[r];
  }
  const int64_t g0 = floor_div(d0, o.group);
  for (int64_t r = r_lo; r < n;) {  // rows by diagonal group: slot t holds group g0 + t
    const int64_t g = floor_div(d0 + r, o.group), end = std::min(n, (g + 1) * o.group - d0);
    o.by_group[j * o.G + (g - g0)] += sum_range(p, r, end);
    r = end;
  }
}

