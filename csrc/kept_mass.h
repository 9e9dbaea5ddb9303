// The held-out check of sample_scores_cpu.cpp (`rows_kept_mass`): the share of each query row's softmax mass that a
// layout keeps, in one pass over the keys with an online softmax: per chunk of keys, the scores of the rows that
// see the chunk, their running max and sum, and the sum over the layout's key ranges inside the chunk, both
// rescaled when the max grows.  No [Lk, rows] buffer, no second pass, and no score for a
// key after a row's position (the rows, sorted by position, that see a chunk are a suffix: the GEMM shrinks).
// Readable definition: sparse_attn.estimators.row_sample.rows_kept_mass.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_exp.h"

namespace kept_mass {

// Key ranges [lo, hi) a layout row keeps, sorted by start, with each range's running maximum of ends (so the first
// range that may reach past a key is a binary search even if ranges overlap).
struct Ranges {
  std::vector<int64_t> lo, hi, hi_max;

  Ranges(const int32_t* offsets, int64_t tiles, const int32_t* columns, int64_t cols, int64_t block_n, int64_t Lk) {
    std::vector<std::pair<int64_t, int64_t>> r;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t a = std::clamp<int64_t>(offsets[t], 0, Lk), b = std::clamp<int64_t>(offsets[t] + block_n, a, Lk);
      if (b > a) r.emplace_back(a, b);
    }
    for (int64_t c = 0; c < cols; ++c)
      if (columns[c] >= 0 && columns[c] < Lk) r.emplace_back(columns[c], columns[c] + 1);
    std::sort(r.begin(), r.end());
    int64_t top = 0;
    for (const auto& [a, b] : r) {
      lo.push_back(a);
      hi.push_back(b);
      top = std::max(top, b);
      hi_max.push_back(top);
    }
  }

  // Sum over the kept keys in [j0, j1) from prefix sums: before(j) is the sum of keys [j0, j) (j0 <= j <= j1).
  template <typename F>
  float sum(F before, int64_t j0, int64_t j1) const {
    float total = 0.f;
    auto it = std::upper_bound(hi_max.begin(), hi_max.end(), j0);  // ranges before it end at or before j0
    for (size_t i = it - hi_max.begin(); i < lo.size() && lo[i] < j1; ++i) {
      const int64_t a = std::max(lo[i], j0), b = std::min(hi[i], j1);
      if (b > a) total += before(b) - before(a);
    }
    return total;
  }
};

// One unit: rows[c] (query row c, D values, pre-scaled) sees keys [0, lim[c]) with lim ascending, keeps the key
// ranges *ranges[c]; writes mass[c], the kept share of its softmax mass (0 for a row that sees no key).  Per chunk
// of keys: S^T = K Q^T for the rows that see it (keys' rows read where they are; rows side by side, so the softmax
// steps vectorise over rows), exp in place as running prefix sums over the chunk's keys, and each kept range's
// mass as one difference of them.
// Keys of another type than the GEMM's (fp32 keys, bf16 GEMMs) are converted a chunk at a time.
template <typename T, typename TK>
void rows_mass(const std::vector<const T*>& rows, const std::vector<int64_t>& lim,
               const std::vector<const Ranges*>& ranges, const TK* k, int64_t ldk, int64_t Lk, int64_t D, float* mass) {
  constexpr bool kLow = !std::is_same_v<T, float>;
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  const int64_t N = static_cast<int64_t>(rows.size());
  std::vector<T> qt(N * D);  // Q^T [D, N]; bf16: VNNI (element (d, c) at (d / 2) * 2N + 2c + d % 2)
  for (int64_t c = 0; c < N; ++c)
    for (int64_t d = 0; d < D; ++d) qt[kLow ? (d / 2) * 2 * N + 2 * c + d % 2 : d * N + c] = rows[c][d];
  const int64_t step = std::clamp<int64_t>(16384 / std::max<int64_t>(N, 1) / 16 * 16, 64, 256);
  std::vector<float> S(N * step), m(N, ninf), sum(N, 0.f), kept(N, 0.f), cm(N), shift(N);
  std::vector<T> kbuf(std::is_same_v<T, TK> ? 0 : step * D);
  for (int64_t j0 = 0; j0 < Lk; j0 += step) {
    const int64_t keys = std::min(step, Lk - j0);
    const int64_t first = std::upper_bound(lim.begin(), lim.end(), j0) - lim.begin();  // rows that see j0
    if (first >= N) break;
    const T* a;
    int64_t lda = ldk;
    if constexpr (std::is_same_v<T, TK>) {
      a = k + j0 * ldk;
    } else {
      for (int64_t i = 0; i < keys; ++i)
        for (int64_t d = 0; d < D; ++d) kbuf[i * D + d] = static_cast<T>(k[(j0 + i) * ldk + d]);
      a = kbuf.data();
      lda = D;
    }
    at::native::cpublas::brgemm(keys, N - first, D, lda, N, N, false, a, qt.data() + (kLow ? 2 : 1) * first,
                                S.data() + first, kLow);
    for (int64_t j = std::max(j0, lim[first]); j < j0 + keys; ++j) {  // keys every row sees need no mask
      float* s = S.data() + (j - j0) * N;
#pragma omp simd
      for (int64_t c = first; c < N; ++c) s[c] = j < lim[c] ? s[c] : ninf;
    }
    std::fill(cm.begin() + first, cm.end(), ninf);
    for (int64_t j = 0; j < keys; ++j) {
      const float* s = S.data() + j * N;
#pragma omp simd
      for (int64_t c = first; c < N; ++c) cm[c] = s[c] > cm[c] ? s[c] : cm[c];
    }
    for (int64_t c = first; c < N; ++c) {  // a visible row has a finite score in the chunk: m becomes finite
      const float m_new = std::max(m[c], cm[c]);
      const float rescale = exp_nonpositive(m[c] - m_new);  // m = -inf at first: 0
      sum[c] *= rescale;
      kept[c] *= rescale;
      m[c] = shift[c] = m_new;
    }
    std::vector<float>& run = cm;  // running prefix sums per row, over the chunk's keys
    std::fill(run.begin() + first, run.end(), 0.f);
    for (int64_t j = 0; j < keys; ++j) {
      float* s = S.data() + j * N;
#pragma omp simd
      for (int64_t c = first; c < N; ++c) {
        run[c] += exp_nonpositive(s[c] - shift[c]);  // -inf (hidden) gives 0
        s[c] = run[c];
      }
    }
    for (int64_t c = first; c < N; ++c) {
      sum[c] += run[c];
      auto before = [&](int64_t key) { return key <= j0 ? 0.f : S[(key - 1 - j0) * N + c]; };
      kept[c] += ranges[c]->sum(before, j0, j0 + keys);
    }
  }
  for (int64_t c = 0; c < N; ++c) mass[c] = sum[c] > 0.f ? kept[c] / sum[c] : 0.f;
}

}  // namespace kept_mass
