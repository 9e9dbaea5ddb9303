// Pass 2 of the fused sample-score pass (sample_scores_cpu.cpp): one key's probabilities over a head's n sample rows
// reduced to column mass, column mass off the local band, diagonal mass and column mass by diagonal group.
// Plain loops that GCC vectorises (the 16-lane sums).  Tried and dropped (measured at 32K, 8 heads, 2 cores): an
// AVX-512 version (masked vector sums, the diagonal mass in a sliding window of registers): 15-19 vs 13 ms for the
// pass; a tree for the lanes' final sum and the column as the sum of the group slots: no gain within the noise.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "vec16.h"


inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Sum of x[lo, hi) in 16 independent lanes (GCC vectorises this; it left `omp simd reduction` loops scalar), the
// lanes added in the order of bulk::sum_lanes_of_16's tree, so that a key's column mass has the same bits on both
// paths (equal masses must stay equal: ties go to the lower index).
inline float sum_range(const float* x, int64_t lo, int64_t hi) {
  float lane[16] = {};
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += x[i + l];
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  float tail = 0.f;
  for (; i < hi; ++i) tail += x[i];
  return lane[0] + tail;
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


// ---- Pass 2 for 16 keys at a time, where no special case applies (most keys) ----
// A "bulk" block: 16 consecutive keys of one head, each seen by all n = 16 * NV sample rows at distance >= local
// (so the local band is empty) and at or after the sink columns.  Per key the rows are 16-lane vectors, so the
// sums across rows (column, diagonal group) are horizontal: done for 16 keys at once by a transpose-and-add tree
// (15 shuffle pairs per 16 keys instead of a 16-step scalar sum per key and sum).  The diagonals a key adds to are
// its rows shifted by one lane per key: accumulated in NV + 1 registers over the block (lane shifts), then added to
// memory once.  GCC vector extensions: the same code on any x86 (AVX-512 here, two AVX2 halves elsewhere).
namespace bulk {

using vec16::v16;
using vec16::v16i;
using vec16::load;
using vec16::store;
constexpr int kMaxBounds = 4;  // diagonal groups a block handles: G <= kMaxBounds + 1

// Lanes [16 - O, 32) of the pair (a, b): b shifted up by O lanes, a's top O lanes shifted in.
template <int O, int... L>
inline v16 align_impl(v16 a, v16 b, std::integer_sequence<int, L...>) {
  return VEC16_SHUFFLE(a, b, (16 - O + L)...);
}
template <int O>
inline v16 align(v16 a, v16 b) { return align_impl<O>(a, b, std::make_integer_sequence<int, 16>{}); }

// One level of the transpose-and-add tree: x and y hold 16 / W keys each, W lanes per key; the result holds x's
// keys then y's, W / 2 lanes per key (each the sum of two).
constexpr int lo_lane(int W, int l) { return (l >= 8 ? 16 : 0) + ((l % 8) / (W / 2)) * W + (l % 8) % (W / 2); }
template <int W, int... L>
inline v16 fold_impl(v16 x, v16 y, std::integer_sequence<int, L...>) {
  return VEC16_SHUFFLE(x, y, lo_lane(W, L)...) + VEC16_SHUFFLE(x, y, (lo_lane(W, L) + W / 2)...);
}
template <int W>
inline v16 fold(v16 x, v16 y) { return fold_impl<W>(x, y, std::make_integer_sequence<int, 16>{}); }

// v[k] for 16 keys -> one vector whose lane k is the sum of v[k]'s lanes.
inline v16 sum_lanes_of_16(v16* v) {
  for (int i = 0; i < 8; ++i) v[i] = fold<16>(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 4; ++i) v[i] = fold<8>(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 2; ++i) v[i] = fold<4>(v[2 * i], v[2 * i + 1]);
  return fold<2>(v[0], v[1]);
}

template <int NV, typename Stored>
struct Block {
  const Stored* s;  // key j's rows at s + (j - j0) * ld
  int64_t ld;
  v16 f[NV];       // the rows' factors (stored values -> probabilities)
  v16 diag[NV + 1] = {};
  v16 col[16], below[kMaxBounds][16];
  int64_t bound[16][kMaxBounds];  // per key: rows below bound[jj][t] lie in its diagonal groups 0..t
  int n_bounds;

  template <int JJ>
  void key() {
    v16 p[NV];
    const Stored* row = s + JJ * ld;
    for (int k = 0; k < NV; ++k) p[k] = load(row + 16 * k) * f[k];
    v16 c = p[0];
    for (int k = 1; k < NV; ++k) c += p[k];
    col[JJ] = c;
    for (int t = 0; t < n_bounds; ++t) {
      v16 b = {};
      for (int k = 0; k < NV; ++k) {
        v16i lane = v16i{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + 16 * k;
        b += lane < static_cast<int32_t>(bound[JJ][t]) ? p[k] : v16{};
      }
      below[t][JJ] = b;
    }
    // key j0 + JJ adds row r to diagonal d0 + r, d0 = pos0 - j0 - JJ: lane 15 - JJ + r of the block's window
    constexpr int O = 15 - JJ;
    diag[0] += align<O>(v16{}, p[0]);
    for (int k = 1; k < NV; ++k) diag[k] += align<O>(p[k - 1], p[k]);
    diag[NV] += align<O>(p[NV - 1], v16{});
  }
  template <int... JJ>
  void keys(std::integer_sequence<int, JJ...>) { (key<JJ>(), ...); }
};

// Keys j0 .. j0 + 15 of one head (a bulk block, see above): s = their stored values (key-major, row stride ld;
// fp32 or fp16), f = the rows' factors, n = 16 * NV rows.
template <int NV, typename Stored>
void reduce_16_keys(const Stored* s, int64_t ld, const float* f, int64_t j0, const KeyOut& o) {
  Block<NV, Stored> b;
  b.s = s;
  b.ld = ld;
  for (int k = 0; k < NV; ++k) b.f[k] = load(f + 16 * k);
  b.n_bounds = static_cast<int>(o.G - 1);
  for (int jj = 0; jj < 16; ++jj) {
    const int64_t d0 = o.pos0 - j0 - jj, u = d0 - floor_div(d0, o.group) * o.group;  // row 0's place in its group
    for (int t = 0; t < b.n_bounds; ++t) b.bound[jj][t] = (t + 1) * o.group - u;
  }
  b.keys(std::make_integer_sequence<int, 16>{});
  const v16 col = sum_lanes_of_16(b.col);
  store(o.column + j0, col);
  store(o.off_local + j0, col);
  v16 prev = {};
  for (int t = 0; t <= b.n_bounds; ++t) {
    const v16 upto = t < b.n_bounds ? sum_lanes_of_16(b.below[t]) : col;  // rows in groups 0..t
    const v16 slot = upto - prev;
    for (int jj = 0; jj < 16; ++jj) o.by_group[(j0 + jj) * o.G + t] = slot[jj];
    prev = upto;
  }
  float* d = o.diagonal + (o.pos0 - j0 - 15);  // window lane 0; its last lane (16 * NV + 15) is always 0
  for (int k = 0; k < NV; ++k) store(d + 16 * k, load(d + 16 * k) + b.diag[k]);
  for (int l = 0; l < 15; ++l) d[16 * NV + l] += b.diag[NV][l];
}

// Whether keys j0 .. j0 + 15 form a bulk block for this head, n rows, G groups.
inline bool is_bulk(int64_t j0, int64_t n, const KeyOut& o) {
  return n % 16 == 0 && n <= 16 * vec16::kMaxRowVectors && o.G - 1 <= kMaxBounds && j0 >= o.sink &&
         o.pos0 - (j0 + 15) >= std::max<int64_t>(o.local, 0);
}

// A bulk block of n = 16 * NV rows, NV from 1 to vec16::kMaxRowVectors.
template <typename Stored, int NV = 1>
void reduce_bulk(const Stored* s, int64_t ld, const float* f, int64_t n, int64_t j0, const KeyOut& o) {
  if (n == 16 * NV)
    reduce_16_keys<NV>(s, ld, f, j0, o);
  else if constexpr (NV < vec16::kMaxRowVectors)
    reduce_bulk<Stored, NV + 1>(s, ld, f, n, j0, o);
}

}  // namespace bulk
