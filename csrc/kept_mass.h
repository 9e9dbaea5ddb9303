// The held-out check of sample_scores_cpu.cpp (`rows_kept_mass`): the share of each query row's softmax mass that a
// layout keeps, in one pass over the keys with an online softmax: per chunk of keys, the scores of the rows that
// see the chunk, their running max and sum, and the sum over the layout's key ranges inside the chunk, both
// rescaled when the max grows.  No [Lk, rows] buffer, no second pass, and no score for a
// key after a row's position (the rows, sorted by position, that see a chunk are a suffix: the GEMM shrinks).
// Where the time goes (32K, 8 heads, 32 rows, D=128, 2 cores, bf16 GEMMs): the GEMM about two thirds, near the
// CPU's bf16 peak; the rest is the softmax (per 16-row block, on AVX-512 registers where the build has them), the
// keys' conversion to bf16 (their reads prefetched during the softmax) and the ranges.
// Readable definition: sparse_attn.estimators.row_sample.rows_kept_mass.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16_convert.h"
#include "cpu_exp.h"

namespace kept_mass {

// The key ranges [lo, hi) that layout rows keep, all rows in one table (no allocation per row): row i's ranges,
// sorted by start, are entries [begin[i], begin[i + 1]).
class RangeTable {
 public:
  // Adds a layout row (its tiles' offsets and its columns, clamped to the keys); returns its index.
  int64_t add(const int32_t* offsets, int64_t tiles, const int32_t* columns, int64_t cols, int64_t block_n,
              int64_t Lk) {
    t_.clear();
    c_.clear();
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t a = std::clamp<int64_t>(offsets[i], 0, Lk), b = std::clamp<int64_t>(offsets[i] + block_n, a, Lk);
      if (b > a) t_.emplace_back(a, b);
    }
    for (int64_t i = 0; i < cols; ++i)
      if (columns[i] >= 0 && columns[i] < Lk) c_.emplace_back(columns[i], columns[i] + 1);
    // patterns list tiles and columns in ascending order: a merge, not a sort (sorting cost 5% of the check)
    if (!std::is_sorted(t_.begin(), t_.end())) std::sort(t_.begin(), t_.end());
    if (!std::is_sorted(c_.begin(), c_.end())) std::sort(c_.begin(), c_.end());
    std::merge(t_.begin(), t_.end(), c_.begin(), c_.end(), std::back_inserter(r_));
    begin_.push_back(static_cast<int64_t>(r_.size()));
    return static_cast<int64_t>(begin_.size()) - 2;
  }

  // Where row i's ranges start: the cursor `sum` takes.
  int64_t start(int64_t i) const { return begin_[i]; }

  // Row i's sum over its kept keys in [j0, j1), from prefix sums: before(j) is the sum of keys [j0, j)
  // (j0 <= j <= j1).  `next`: the caller's cursor (from `start(i)`) for ascending, non-overlapping [j0, j1), so
  // no search per chunk: it passes the ranges that end by j0 up to the first that does not (a range further on
  // that also ends by j0, one inside a longer range, is visited and adds 0).
  template <typename F>
  float sum(int64_t i, F before, int64_t j0, int64_t j1, int64_t& next) const {
    const int64_t stop = begin_[i + 1];
    while (next < stop && r_[next].second <= j0) ++next;
    float total = 0.f;
    for (int64_t e = next; e < stop && r_[e].first < j1; ++e) {
      const int64_t a = std::max<int64_t>(r_[e].first, j0), b = std::min<int64_t>(r_[e].second, j1);
      if (b > a) total += before(b) - before(a);
    }
    return total;
  }

 private:
  std::vector<std::pair<int64_t, int64_t>> r_, t_, c_;  // the table; one row's tiles and columns (reused)
  std::vector<int64_t> begin_{0};
};

// p rounded up to a multiple of 64 bytes (a cache line; the buffer has room for it).
template <typename T>
T* aligned64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) / 64 * 64);
}

// Rows per vector step: one 512-bit register of fp32 (the loops over a block's rows compile to one vector op each).
constexpr int64_t kLanes = 16;

// Prefetches the keys ahead of the pass a few cache lines per step of the softmax loops (`plan` spreads the lines up
// to a key over a chunk's steps), so that the next chunks' reads overlap the compute.  Without it the conversion of
// each chunk waited on memory (the hardware prefetcher stops at every 4 KiB page: 8 keys of 128 fp32 values), and
// the same prefetches in one burst stalled the core instead.
struct KeyPrefetch {
  static constexpr int64_t kChunks = 2;  // how far ahead: 1 to 4 chunks measured the same at 32K

  const char* base;
  int64_t row_stride, row_bytes;
  int64_t row = 0, byte = 0, limit = 0, per_step = 0;  // the next line: key row `row`, `byte` into it
  const char *next = nullptr, *stop = nullptr;  // keys in one run (row_stride == row_bytes): lines [next, stop)

  void plan(int64_t from_key, int64_t to_key, int64_t steps) {
    if (row < from_key) row = from_key, byte = 0;
    limit = std::max(to_key, row);
    const int64_t lines = (limit - row) * ((row_bytes + 63) / 64) - byte / 64;
    per_step = steps > 0 ? (lines + steps - 1) / steps : 0;
    if (row_stride == row_bytes) {
      next = base + row * row_bytes + byte, stop = base + limit * row_bytes;
      row = limit, byte = 0;  // where this plan ends (the next plan starts there)
    }
  }
  void step() {
    if (next < stop) {  // one run of lines: no row bookkeeping per line
      for (int64_t i = 0; i < per_step && next < stop; ++i, next += 64) __builtin_prefetch(next, 0, 2);
      return;
    }
    for (int64_t i = 0; i < per_step && row < limit; ++i) {
      __builtin_prefetch(base + row * row_stride + byte, 0, 2);
      byte += 64;
      if (byte >= row_bytes) byte = 0, ++row;
    }
  }
};

// The online-softmax step of one chunk of `keys` keys for kLanes rows: s (stride ld) holds their scores, valid for
// keys j < vis[l] (the rest hidden: anything, never read into a sum).  Rescales the rows' running max m, sum and
// kept mass to the chunk's new max, then turns the scores into running prefix sums of exp(score - max) in place
// (a hidden key adds 0), so that a kept range's mass is one difference of them.
__attribute__((always_inline)) inline void softmax_prefix(float* s, int64_t ld, int64_t keys, const int32_t* vis,
                                                          float* m, float* sum, float* kept, KeyPrefetch& ahead) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  constexpr int32_t kChains = 4;  // the max over keys in 4 independent chains (one chain waits on each max's latency)
  float tops[kChains][kLanes], top[kLanes], run[kLanes];
  for (int32_t a = 0; a < kChains; ++a)
    for (int64_t l = 0; l < kLanes; ++l) tops[a][l] = a == 0 ? m[l] : ninf;
  int32_t j = 0;
  for (; j + kChains <= keys; j += kChains)
    for (int32_t a = 0; a < kChains; ++a) {
      const float* x = s + (j + a) * ld;
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const float v = j + a < vis[l] ? x[l] : ninf;
        tops[a][l] = v > tops[a][l] ? v : tops[a][l];
      }
    }
  for (; j < keys; ++j) {
    const float* x = s + j * ld;
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = j < vis[l] ? x[l] : ninf;
      tops[0][l] = v > tops[0][l] ? v : tops[0][l];
    }
  }
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l)
    top[l] = std::max(std::max(tops[0][l], tops[1][l]), std::max(tops[2][l], tops[3][l]));
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {  // a row that has seen no key yet keeps m = -inf and sum 0
    const float rescale = top[l] == ninf ? 1.f : exp_nonpositive(m[l] - top[l]);  // m = -inf: 0
    sum[l] *= rescale;
    kept[l] *= rescale;
    m[l] = top[l];
    run[l] = 0.f;
  }
  for (int32_t j = 0; j < keys; ++j) {
    float* x = s + j * ld;
    ahead.step();
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      run[l] += exp_nonpositive(j < vis[l] ? x[l] - top[l] : -100.f);  // below -87: 0
      x[l] = run[l];
    }
  }
  for (int64_t l = 0; l < kLanes; ++l) sum[l] += run[l];
}

#if defined(__AVX512F__)
// 2^y for 16 lanes, 0 in the lanes `keep` leaves out: a degree-5 polynomial on the fraction (relative error 2e-7)
// and VSCALEFPS for the power of two; y below -125 counts as -125 (2^-125: nothing next to a sum >= 1).
inline __m512 exp2_avx512(__m512 y, __mmask16 keep) {
  y = _mm512_max_ps(y, _mm512_set1_ps(-125.f));  // NaN (a row with no key yet: -inf - -inf) -> -125 as well
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.3288039481e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6755288541e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5506765842e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022120237e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314700365e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0000001192f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// `softmax_prefix` on AVX-512 registers (a block of kLanes rows is one register): half the instructions of the
// portable loops' exp (Cody-Waite reduction, bit-built power of two, selects), which the compiler cannot emit.
inline void softmax_prefix_avx512(float* s, int64_t ld, int64_t keys, const int32_t* vis, float* m, float* sum,
                                  float* kept, KeyPrefetch& ahead) {
  static_assert(kLanes == 16, "one AVX-512 register of fp32 per block");
  const __m512i seen = _mm512_loadu_si512(vis);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), log2e = _mm512_set1_ps(1.44269504f);
  const __m512 m_old = _mm512_loadu_ps(m);
  __m512 t0 = m_old, t1 = ninf, t2 = ninf, t3 = ninf;  // the max in 4 independent chains
  auto visible = [&](int32_t j) { return _mm512_cmpgt_epi32_mask(seen, _mm512_set1_epi32(j)); };
  int32_t j = 0;
  for (; j + 4 <= keys; j += 4) {
    t0 = _mm512_mask_max_ps(t0, visible(j), t0, _mm512_loadu_ps(s + j * ld));
    t1 = _mm512_mask_max_ps(t1, visible(j + 1), t1, _mm512_loadu_ps(s + (j + 1) * ld));
    t2 = _mm512_mask_max_ps(t2, visible(j + 2), t2, _mm512_loadu_ps(s + (j + 2) * ld));
    t3 = _mm512_mask_max_ps(t3, visible(j + 3), t3, _mm512_loadu_ps(s + (j + 3) * ld));
  }
  for (; j < keys; ++j) t0 = _mm512_mask_max_ps(t0, visible(j), t0, _mm512_loadu_ps(s + j * ld));
  const __m512 top = _mm512_max_ps(_mm512_max_ps(t0, t1), _mm512_max_ps(t2, t3));
  // rows that have seen no key yet (top = -inf) keep sum 0 and kept 0 whatever the factor
  const __m512 rescale = exp2_avx512(_mm512_mul_ps(_mm512_sub_ps(m_old, top), log2e),
                                     _mm512_cmp_ps_mask(top, ninf, _CMP_NEQ_OQ));
  _mm512_storeu_ps(sum, _mm512_mul_ps(_mm512_loadu_ps(sum), rescale));
  _mm512_storeu_ps(kept, _mm512_mul_ps(_mm512_loadu_ps(kept), rescale));
  _mm512_storeu_ps(m, top);
  const __m512 shift = _mm512_mul_ps(top, log2e);
  __m512 run = _mm512_setzero_ps();
  for (j = 0; j < keys; ++j) {
    float* x = s + j * ld;
    ahead.step();
    run = _mm512_add_ps(run, exp2_avx512(_mm512_fmsub_ps(_mm512_loadu_ps(x), log2e, shift), visible(j)));
    _mm512_storeu_ps(x, run);
  }
  _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_loadu_ps(sum), run));
}
#endif

// One unit: rows[c] (query row c, D values, pre-scaled) sees keys [0, lim[c]) with lim ascending, keeps the key
// ranges of row span[c] of `ranges`; writes mass[c], the kept share of its softmax mass (0 for a row that sees no
// key).  Per chunk of keys: S^T = K Q^T for the rows that see it (keys' rows read where they are; rows side by
// side, padded to a multiple of kLanes, so the softmax steps vectorise over rows), the online softmax as prefix sums
// (`softmax_prefix`), and each kept range's mass as one difference of them.
// Keys of another type than the GEMM's (fp32 keys, bf16 GEMMs) are converted a chunk at a time.  `native`: the
// AVX512_BF16 conversion and the AVX-512 softmax where the build has them; false: the portable loops everywhere
// (c10's rounding, `softmax_prefix`), which the tests check on this machine too.
template <typename T, typename TK>
void rows_mass(const std::vector<const T*>& rows, const std::vector<int64_t>& lim, const RangeTable& ranges,
               const std::vector<int64_t>& span, const TK* k, int64_t ldk, int64_t Lk, int64_t D, float* mass,
               bool native = true) {
  constexpr bool kLow = !std::is_same_v<T, float>;
  constexpr bool kConvert = !std::is_same_v<T, TK>;
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  const int64_t N = static_cast<int64_t>(rows.size()), Np = (N + kLanes - 1) / kLanes * kLanes;
  // Q^T [D, Np], zeros past N; bf16: VNNI (element (d, c) at (d / 2) * 2Np + 2c + d % 2); 64-byte aligned
  std::vector<T> qt_buffer(Np * D + 64 / sizeof(T));
  T* qt = aligned64(qt_buffer.data());
  for (int64_t c = 0; c < N; ++c)
    for (int64_t d = 0; d < D; ++d) qt[kLow ? (d / 2) * 2 * Np + 2 * c + d % 2 : d * Np + c] = rows[c][d];
  const int64_t step = std::clamp<int64_t>(16384 / std::max<int64_t>(N, 1) / 16 * 16, 64, 256);
  // S^T's row stride: an odd number of cache lines, so a block's column of scores (one line per key) spreads over
  // all of L1's sets (at 128 rows, 512 bytes apart, it fell on an eighth of them and came from L2 at each pass)
  const int64_t ldS = (Np / kLanes) % 2 ? Np : Np + kLanes;
  std::vector<float> S_buffer(ldS * step + 16), m(Np, ninf), sum(Np, 0.f), kept(Np, 0.f);
  float* S = aligned64(S_buffer.data());
  std::vector<int32_t> vis(Np, 0);   // per row: how many of the chunk's keys it sees
  std::vector<int64_t> cursor(N);  // per row: its first range not yet summed (see RangeTable::sum)
  for (int64_t c = 0; c < N; ++c) cursor[c] = ranges.start(span[c]);
  std::vector<T> kbuf_buffer(kConvert ? step * D + 64 / sizeof(T) : 0);
  T* kbuf = aligned64(kbuf_buffer.data());
  const int64_t end = lim.empty() ? 0 : std::min(Lk, lim.back());  // no row sees a key past it
  KeyPrefetch ahead{reinterpret_cast<const char*>(k), ldk * static_cast<int64_t>(sizeof(TK)),
                    D * static_cast<int64_t>(sizeof(TK))};
  for (int64_t j0 = 0; j0 < end; j0 += step) {
    const int64_t keys = std::min(step, end - j0);
    const int64_t first = std::upper_bound(lim.begin(), lim.end(), j0) - lim.begin();  // rows that see j0
    const T* a;
    int64_t lda = ldk;
    if constexpr (kConvert) {
      if (ldk == D)
        bf16_convert::to_bf16(k + j0 * ldk, kbuf, keys * D, native);
      else
        for (int64_t i = 0; i < keys; ++i)
          bf16_convert::to_bf16(k + (j0 + i) * ldk, kbuf + i * D, D, native);
      a = kbuf;
      lda = D;
    } else {
      a = k + j0 * ldk;
    }
    // the GEMM from the start of `first`'s block of kLanes rows: whole vectors, aligned loads of Q^T (with first
    // as the edge, the GEMM was 13% slower for all its fewer rows); the rows before `first` see none of the chunk's
    // keys: their scores are not read
    const int64_t c_start = first / kLanes * kLanes;
    at::native::cpublas::brgemm(keys, Np - c_start, D, lda, Np, ldS, false, a, qt + (kLow ? 2 : 1) * c_start,
                                S + c_start, kLow);
    for (int64_t c = c_start; c < N; ++c) vis[c] = static_cast<int32_t>(std::clamp<int64_t>(lim[c] - j0, 0, keys));
    ahead.plan(j0 + keys, std::min(end, j0 + (1 + KeyPrefetch::kChunks) * step), keys * ((Np - c_start) / kLanes));
    for (int64_t c0 = c_start; c0 < Np; c0 += kLanes) {
#if defined(__AVX512F__)
      if (native) {
        softmax_prefix_avx512(S + c0, ldS, keys, vis.data() + c0, m.data() + c0, sum.data() + c0,
                              kept.data() + c0, ahead);
        continue;
      }
#endif
      softmax_prefix(S + c0, ldS, keys, vis.data() + c0, m.data() + c0, sum.data() + c0, kept.data() + c0,
                     ahead);
    }
    for (int64_t c = first; c < N; ++c) {
      auto before = [&](int64_t key) { return key <= j0 ? 0.f : S[(key - 1 - j0) * ldS + c]; };
      kept[c] += ranges.sum(span[c], before, j0, j0 + keys, cursor[c]);
    }
  }
  for (int64_t c = 0; c < N; ++c) mass[c] = sum[c] > 0.f ? kept[c] / sum[c] : 0.f;
}

}  // namespace kept_mass
