// Keys a softmax row needs for a share gamma of its mass, from a histogram of its log-probabilities: the compiled
// twin of sparse_attn.estimators.mass_count.keys_for_mass (same buckets, same interpolation inside the crossing
// bucket; keys_for_mass_sorted is the exact definition).  Used by row_need_cpu.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

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
// the torch version's own last bucket).  A histogram of about a hundred buckets per row instead of n_buckets:
// the rows' histograms stay in L1.
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

}  // namespace mass_histogram
