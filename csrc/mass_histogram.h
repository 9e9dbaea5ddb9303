// Keys a softmax row needs for a share gamma of its mass, from a histogram of its log-probabilities: the compiled
// twin of sparse_attn.estimators.mass_count.keys_for_mass (same buckets, same interpolation inside the crossing
// bucket; keys_for_mass_sorted is the exact definition), for many rows at once.  Used by row_need_cpu.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_exp.h"

namespace mass_histogram {

// Bucket of a key with logit s in a row of log-sum-exp lse: floor(-log p * per_nat), clamped to [0, last]; a
// hidden key (s = -inf) falls in the last bucket, as p = 0 does in the torch version.
inline int32_t bucket(float s, float lse, float per_nat, int32_t last) {
  const float t = (lse - s) * per_nat;
  return t < static_cast<float>(last) ? static_cast<int32_t>(std::max(t, 0.f)) : last;
}

// The last bucket a histogram of a row of `keys` probabilities needs: the keys in the buckets from `deep` on hold
// less than (1 - gamma) / 4 of the mass together (each below exp(-deep / per_nat), so keys x that), so the
// cumulative mass reaches gamma before them and one shared bucket `deep` serves them all (below n_buckets - 1,
// the torch version's own last bucket).  About a hundred buckets per row instead of n_buckets: the rows'
// histograms stay in L1.
inline int32_t last_bucket(int64_t keys, float gamma, float per_nat, int32_t n_buckets) {
  if (!(gamma < 1.f)) return n_buckets - 1;
  const double deep = std::ceil(per_nat * std::log(4.0 * static_cast<double>(keys) / (1.0 - gamma)));
  return static_cast<int32_t>(std::min<double>(deep, n_buckets - 1));
}

// The bucket x where the cumulative mass of `mass` (largest probabilities first) first reaches gamma (or the last),
// and the mass before it.  Cumulative sums in double rounded to fp32, as torch's CPU cumsum gives them.
struct Crossing {
  int32_t x;
  float before, in;
};

inline Crossing crossing(const float* mass, int32_t buckets, float gamma) {
  double cum = 0.0;
  int32_t x = 0;
  for (; x < buckets - 1; ++x) {
    cum += mass[x];
    if (!(static_cast<float>(cum) < gamma)) break;
  }
  if (x == buckets - 1) cum += mass[x];
  return {x, static_cast<float>(cum) - mass[x], mass[x]};
}

// Keys needed: the `before` keys of the buckets before the crossing, plus those of the crossing bucket (`in` keys
// holding mass c.in) needed if its probabilities were equal; at most `keys`.  fp32, as keys_for_mass computes it.
inline float keys_needed(const Crossing& c, float before, float in, float gamma, int64_t keys) {
  const float per_key = c.in / std::max(in, 1.f);
  float inside = std::ceil((gamma - c.before) / std::max(per_key, std::numeric_limits<float>::min()));
  inside = std::min(std::max(inside, 1.f), std::max(in, 1.f));
  return std::min(before + inside, static_cast<float>(keys));
}

// mass[slot[e]] += p[e] for the first n entries whose slot is >= 0 (slots of different entries of one block may
// repeat).  With AVX-512 the entries kept are packed first (most keys of a row are deep: skipped, not branched
// on); slot and p are scratch, padded to a multiple of 16.
inline void add_kept(int32_t* slot, float* p, int64_t n, float* mass) {
#if defined(__AVX512F__)
  int64_t kept = 0;
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 lanes = n - e >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - e)) - 1);
    const __m512i s = _mm512_maskz_loadu_epi32(lanes, slot + e);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, p + e);
    const __mmask16 keep = _mm512_mask_cmpge_epi32_mask(lanes, s, _mm512_setzero_si512());
    _mm512_storeu_si512(slot + kept, _mm512_maskz_compress_epi32(keep, s));  // in place: kept <= e
    _mm512_storeu_ps(p + kept, _mm512_maskz_compress_ps(keep, v));
    kept += __builtin_popcount(keep);
  }
  for (int64_t e = 0; e < kept; ++e) mass[slot[e]] += p[e];
#else
  for (int64_t e = 0; e < n; ++e)
    if (slot[e] >= 0) mass[slot[e]] += p[e];
#endif
}

// For one key of N rows side by side (logits s, rows' log-sum-exp lse): its histogram slot in each row (row c's
// buckets start at c * width; -1 for bucket `drop`: left out) and its probability.  Vectorises over the rows.
inline void slots_of(const float* __restrict s, const float* __restrict lse, int64_t N, float per_nat, int32_t last,
                     int32_t drop, int32_t width, int32_t* __restrict slot, float* __restrict p) {
#pragma omp simd
  for (int64_t c = 0; c < N; ++c) {
    const int32_t b = bucket(s[c], lse[c], per_nat, last);
    slot[c] = b == drop ? -1 : static_cast<int32_t>(c) * width + b;
    p[c] = exp_nonpositive(s[c] - lse[c]);
  }
}

// For N rows side by side (S [K, N]: row c's logits at S[j * N + c], -inf where hidden; lse[c] its log-sum-exp):
// out[c] = the keys row c needs for gamma of its mass, as keys_for_mass counts them with per_nat buckets per unit
// of log-probability, n_buckets in all.  Pass 1: each row's mass histogram (consecutive updates hit different
// rows' histograms; keys in the bucket last_bucket names left out, their mass never decides), its crossing
// bucket; pass 2, vectorised: the keys before and inside that bucket (no histogram of counts).
inline void keys_for_mass(const float* S, const float* lse, int64_t N, int64_t K, float per_nat, int32_t n_buckets,
                          float gamma, float* const* out) {
  const int32_t last = last_bucket(K, gamma, per_nat, n_buckets), width = last + 1;
  // keys in bucket `drop` are left out; none where last is the torch version's own last bucket (gamma = 1)
  const int32_t drop = last < n_buckets - 1 ? last : -1;
  constexpr int64_t kBlock = 16;  // keys whose slots are made (vectorised) before they are added
  std::vector<float> mass(N * width, 0.f), p((kBlock * N + 15) / 16 * 16);
  std::vector<int32_t> slot(p.size());
  for (int64_t j0 = 0; j0 < K; j0 += kBlock) {
    const int64_t keys = std::min(kBlock, K - j0);
    for (int64_t i = 0; i < keys; ++i)
      slots_of(S + (j0 + i) * N, lse, N, per_nat, last, drop, width, slot.data() + i * N, p.data() + i * N);
    add_kept(slot.data(), p.data(), keys * N, mass.data());
  }
  std::vector<Crossing> cross(N);
  std::vector<int32_t> x(N), before(N, 0), in(N, 0);
  for (int64_t c = 0; c < N; ++c) {
    cross[c] = crossing(mass.data() + c * width, width, gamma);
    x[c] = cross[c].x;
  }
  for (int64_t j = 0; j < K; ++j) {
    const float* s = S + j * N;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) {
      const int32_t b = bucket(s[c], lse[c], per_nat, last);
      before[c] += b < x[c];
      in[c] += b == x[c];
    }
  }
  for (int64_t c = 0; c < N; ++c)
    *out[c] = keys_needed(cross[c], static_cast<float>(before[c]), static_cast<float>(in[c]), gamma, K);
}

}  // namespace mass_histogram
