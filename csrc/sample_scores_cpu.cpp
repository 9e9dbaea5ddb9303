// Fused CPU pass for the vertical-slash estimators' sample scores: the softmax of the last n queries against all keys,
// reduced to column mass, column mass off the local band, diagonal mass and column mass split by diagonal group,
// without a [heads, n, Lk] probability tensor (one [Lk, n] fp32 buffer per (batch row, head), reused).
// Per (batch row, head), two passes: (1) per chunk of keys, scores S^T = K Q^T by a batch-reduce GEMM (the keys'
// rows are read where they are: no transposed copy), the causal mask on the last n keys, and, while the chunk is in
// cache, exp(score - chunk max) in place with the rows' running max and sum; (2) one pass over the keys that scales
// each row of S^T to probabilities and turns it into the reductions.  Also the mass a layout keeps of the softmax
// of any query rows (rows_kept_mass: the held-out rows on which Auto checks its candidates), without their
// [heads, rows, Lk] probabilities either.  fp32, or bf16 on the CPU's bf16 GEMMs (fp32 accumulation and softmax).
// Readable definitions: sparse_attn.estimators.sample_mass.torch_sample_scores, row_sample.rows_kept_mass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_exp.h"

namespace {

constexpr int64_t kChunk = 256;  // keys per GEMM call

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Sum of x[lo, hi) in 16 independent lanes: the compiler vectorises this (it left `omp simd reduction` loops over the
// rows scalar, a third of the pass's time).
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

// S^T chunk [keys j0..j0 + m, rows r_lo..n) = K Q^T for q [n, D] (rows, stride ldq) and k [Lk, D] (rows, stride
// ldk): fills Q^T once (qt; bf16: VNNI, element (d, r) at (d / 2) * 2n + 2r + d % 2), then `chunk_scores` per chunk.
template <typename T>
void transpose_rows(const T* q, int64_t ldq, int64_t n, int64_t D, T* qt) {
  constexpr bool kLow = !std::is_same_v<T, float>;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < D; ++d) qt[kLow ? (d / 2) * 2 * n + 2 * r + d % 2 : d * n + r] = q[r * ldq + d];
}

// Scores of keys [j0, j0 + m) against rows [r_lo, n) into S (key-major, row stride n), rows < r_lo untouched.
// Keys of another type than the GEMM's (fp32 keys, bf16 GEMM) are converted a chunk at a time into kbuf [m, D]:
// no bf16 copy of all keys (whose fresh pages cost more than the conversion at 64K).
template <typename T, typename TK>
void chunk_scores(const T* qt, const TK* k, int64_t ldk, int64_t n, int64_t D, int64_t j0, int64_t m, int64_t r_lo,
                  float* S, T* kbuf) {
  constexpr bool kLow = !std::is_same_v<T, float>;
  if (r_lo >= n) return;
  const T* a;
  int64_t lda = ldk;
  if constexpr (std::is_same_v<T, TK>) {
    a = k + j0 * ldk;
  } else {
    for (int64_t i = 0; i < m; ++i) {
      const TK* src = k + (j0 + i) * ldk;
      T* dst = kbuf + i * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
    }
    a = kbuf;
    lda = D;
  }
  at::native::cpublas::brgemm(m, n - r_lo, D, lda, n, n, false, a, qt + (kLow ? 2 * r_lo : r_lo), S + j0 * n + r_lo,
                              kLow);
}

// Softmax statistics kept per chunk, so that each chunk's scores become exp(score - chunk max) while still in cache
// (pass 1), and a row's probability is that times exp(chunk max - row max) / row sum (pass 2): two passes over the
// [Lk, rows] buffer instead of five (at 64K, 16 MiB per head no longer fits the cache).
struct ChunkSoftmax {
  int64_t n;
  std::vector<float> chunk_max, m, sum;  // [chunks, n], [n], [n]
  ChunkSoftmax(int64_t chunks, int64_t n_)
      : n(n_), chunk_max(chunks * n_, -std::numeric_limits<float>::infinity()),
        m(n_, -std::numeric_limits<float>::infinity()), sum(n_, 0.f) {}

  // Chunk c of S (m keys from j0, rows [r_lo, n), hidden entries already -inf): exp in place, statistics merged.
  void absorb(float* S, int64_t c, int64_t j0, int64_t keys, int64_t r_lo) {
    float* cm = chunk_max.data() + c * n;
    for (int64_t j = j0; j < j0 + keys; ++j) {
      const float* s = S + j * n;
#pragma omp simd
      for (int64_t r = r_lo; r < n; ++r) cm[r] = s[r] > cm[r] ? s[r] : cm[r];
    }
    std::vector<float> shift(n), csum(n, 0.f);
    for (int64_t r = r_lo; r < n; ++r) shift[r] = cm[r] == -std::numeric_limits<float>::infinity() ? 0.f : cm[r];
    for (int64_t j = j0; j < j0 + keys; ++j) {
      float* s = S + j * n;
#pragma omp simd
      for (int64_t r = r_lo; r < n; ++r) {
        const float e = exp_nonpositive(s[r] - shift[r]);  // -inf (hidden) gives 0
        s[r] = e;
        csum[r] += e;
      }
    }
    for (int64_t r = r_lo; r < n; ++r) {
      if (cm[r] == -std::numeric_limits<float>::infinity()) continue;
      if (cm[r] > m[r]) {
        sum[r] = sum[r] * exp_nonpositive(m[r] - cm[r]) + csum[r];
        m[r] = cm[r];
      } else {
        sum[r] += csum[r] * exp_nonpositive(cm[r] - m[r]);
      }
    }
  }

  // Per row of chunk c: the factor turning its stored values into probabilities (0 for a row the chunk hides).
  void factors(int64_t c, float* f) const {
    const float* cm = chunk_max.data() + c * n;
    for (int64_t r = 0; r < n; ++r)
      f[r] = (cm[r] == -std::numeric_limits<float>::infinity() || !(sum[r] > 0.f))
                 ? 0.f : exp_nonpositive(cm[r] - m[r]) / sum[r];
  }
};

// One (batch row, head) of `rows_kept_mass`: rows at key positions pos [R] (any order), each seeing keys
// [0, pos + 1) when causal, each in query block blocks[r] of a layout row (tiles at offsets[qb, :counts[qb]] of
// width block_n, single keys columns[qb, :col_counts[qb]]).  Returns the mean over the rows of the softmax mass
// on the layout's keys (a tile's mass is one difference of prefix sums, kept in S in place).
template <typename T>
float kept_head(const T* q, int64_t ldq, const T* k, int64_t ldk, int64_t R, int64_t Lk, int64_t D,
                const int64_t* pos, const int64_t* blocks, bool causal, const int32_t* offsets, const int32_t* counts,
                int64_t width, const int32_t* columns, const int32_t* col_counts, int64_t col_width, int64_t block_n,
                float* S, T* qt) {
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<int64_t> lim(R);
  for (int64_t r = 0; r < R; ++r) lim[r] = causal ? std::clamp<int64_t>(pos[r] + 1, 0, Lk) : Lk;
  // (Scoring each chunk only against the rows that see it saved GEMM work but cost more: GEMMs of varying shapes.)
  transpose_rows(q, ldq, R, D, qt);
  const int64_t chunks = (Lk + kChunk - 1) / kChunk;
  ChunkSoftmax soft(chunks, R);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j0 = c * kChunk, keys = std::min(kChunk, Lk - j0);
    chunk_scores<T, T>(qt, k, ldk, R, D, j0, keys, 0, S, nullptr);
    for (int64_t j = j0; j < j0 + keys; ++j) {
      float* s = S + j * R;
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) s[r] = j < lim[r] ? s[r] : ninf;
    }
    soft.absorb(S, c, j0, keys, 0);
  }
  // S becomes each row's inclusive prefix sums of its probabilities, in place (rows side by side: vectorised)
  std::vector<float> run(R, 0.f), f(R);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j0 = c * kChunk, keys = std::min(kChunk, Lk - j0);
    soft.factors(c, f.data());
    for (int64_t j = j0; j < j0 + keys; ++j) {
      float* s = S + j * R;
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) {
        run[r] += s[r] * f[r];
        s[r] = run[r];
      }
    }
  }
  double total = 0.0;
  for (int64_t r = 0; r < R; ++r) {
    auto before = [&](int64_t key) { return key <= 0 ? 0.f : S[(std::min(key, Lk) - 1) * R + r]; };  // keys < key
    const int64_t qb = blocks[r];
    float kept = 0.f;
    for (int64_t t = 0; t < std::clamp<int64_t>(counts[qb], 0, width); ++t) {
      const int64_t off = offsets[qb * width + t], lo = std::clamp<int64_t>(off, 0, Lk);
      kept += before(std::clamp<int64_t>(off + block_n, lo, Lk)) - before(lo);
    }
    for (int64_t c = 0; c < std::clamp<int64_t>(col_counts[qb], 0, col_width); ++c) {
      const int64_t key = columns[qb * col_width + c];
      if (key >= 0 && key < Lk) kept += before(key + 1) - before(key);
    }
    total += kept;
  }
  return static_cast<float>(total / R);
}

// One (batch row, head): q [n, D] (pre-scaled, rows), k [Lk, D] (rows, stride ldk), rows at key positions
// pos0 .. pos0 + n - 1.  Writes column, off_local, diagonal [Lk], by_group [Lk, G], lse [n].  Pass 1 scores a
// chunk of keys and turns it into exponentials while it is in cache; pass 2 reduces each key's row of S.
template <typename T, typename TK>
void score_head(const T* q, int64_t ldq, const TK* k, int64_t ldk, int64_t n, int64_t Lk, int64_t D, int64_t pos0,
                bool causal, int64_t sink, int64_t local, int64_t group, int64_t G, float* S, T* qt, T* kbuf,
                float* column,
                float* off_local, float* diagonal, float* by_group, float* lse) {
  const float ninf = -std::numeric_limits<float>::infinity();
  transpose_rows(q, ldq, n, D, qt);
  const int64_t chunks = (Lk + kChunk - 1) / kChunk;
  ChunkSoftmax soft(chunks, n);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j0 = c * kChunk, keys = std::min(kChunk, Lk - j0);
    chunk_scores<T, TK>(qt, k, ldk, n, D, j0, keys, 0, S, kbuf);
    if (causal)  // only the last n keys can lie after a sample row: key j hides it from rows r < j - pos0
      for (int64_t j = std::max<int64_t>(pos0 + 1, j0); j < j0 + keys; ++j)
        for (int64_t r = 0; r < std::min(n, j - pos0); ++r) S[j * n + r] = ninf;
    soft.absorb(S, c, j0, keys, 0);
  }
  for (int64_t r = 0; r < n; ++r) lse[r] = soft.sum[r] > 0.f ? soft.m[r] + std::log(soft.sum[r]) : ninf;
  std::fill(diagonal, diagonal + Lk, 0.f);
  std::fill(by_group, by_group + Lk * G, 0.f);
  std::vector<float> f(n), p(n);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j0 = c * kChunk, keys = std::min(kChunk, Lk - j0);
    soft.factors(c, f.data());
    for (int64_t j = j0; j < j0 + keys; ++j) {
      const float* s = S + j * n;
      float* pp = p.data();
      for (int64_t r = 0; r < n; ++r) pp[r] = s[r] * f[r];
      const float col = sum_range(pp, 0, n);
      const int64_t d0 = pos0 - j;                            // distance of row 0 to key j; row r: d0 + r
      const int64_t r_lo = std::clamp<int64_t>(-d0, 0, n);    // first row at distance >= 0
      const float near = sum_range(pp, r_lo, std::max(r_lo, std::clamp<int64_t>(local - d0, 0, n)));
      column[j] = col;
      off_local[j] = col - near;
      if (j >= sink) {
        float* diag = diagonal + d0;
        const int64_t r_hi = std::clamp<int64_t>(Lk - d0, 0, n);
#pragma omp simd
        for (int64_t r = r_lo; r < r_hi; ++r) diag[r] += p[r];
      }
      const int64_t g0 = floor_div(d0, group);
      for (int64_t r = r_lo; r < n;) {  // rows by diagonal group: slot t holds group g0 + t
        const int64_t g = floor_div(d0 + r, group), end = std::min(n, (g + 1) * group - d0);
        by_group[j * G + (g - g0)] += sum_range(pp, r, end);
        r = end;
      }
    }
  }
}

template <typename T, typename TK>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of, const at::Tensor& sink,
         const at::Tensor& local, int64_t pos0, bool causal, int64_t group, int64_t G, at::Tensor& column,
         at::Tensor& off_local, at::Tensor& diagonal, at::Tensor& by_group, at::Tensor& lse) {
  const int64_t B = q.size(0), Hs = q.size(1), n = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const T* qp = q.data_ptr<T>();
  const TK* kp = k.data_ptr<TK>();
  const int64_t* kv = kv_of.data_ptr<int64_t>();
  const int64_t* sk = sink.data_ptr<int64_t>();
  const int64_t* lc = local.data_ptr<int64_t>();
  float *col = column.data_ptr<float>(), *off = off_local.data_ptr<float>(), *dia = diagonal.data_ptr<float>(),
        *grp = by_group.data_ptr<float>(), *ls = lse.data_ptr<float>();
  at::parallel_for(0, B * Hs, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> S(new float[Lk * n]);  // uninitialised: every entry read is written first
    std::vector<T> qt(D * n), kbuf(std::is_same_v<T, TK> ? 0 : kChunk * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hs, h = bh % Hs, kvh = std::clamp<int64_t>(kv[h], 0, Hkv - 1);
      score_head<T, TK>(qp + b * q.stride(0) + h * q.stride(1), q.stride(2), kp + b * k.stride(0) + kvh * k.stride(1),
                    k.stride(2), n, Lk, D, pos0, causal, sk[h], lc[h], group, G, S.get(), qt.data(), kbuf.data(), col + bh * Lk, off + bh * Lk,
                    dia + bh * Lk, grp + bh * Lk * G, ls + bh * n);
    }
    if constexpr (!std::is_same_v<T, float>) at::native::cpublas::brgemm_release(true);
  });
}

template <typename T>
void run_kept(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of, const at::Tensor& pos,
              const at::Tensor& blocks, bool causal, const at::Tensor& offsets, const at::Tensor& counts,
              const at::Tensor& columns, const at::Tensor& col_counts, int64_t block_n, at::Tensor& out) {
  const int64_t B = q.size(0), Hs = q.size(1), R = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const int64_t n_qb = counts.size(2), width = offsets.size(3), col_width = columns.size(3);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const int64_t* kv = kv_of.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hs, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> S(new float[Lk * R]);
    std::vector<T> qt(D * R);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hs, h = bh % Hs, kvh = std::clamp<int64_t>(kv[h], 0, Hkv - 1);
      op[bh] = kept_head<T>(qp + b * q.stride(0) + h * q.stride(1), q.stride(2),
                            kp + b * k.stride(0) + kvh * k.stride(1), k.stride(2), R, Lk, D, pos.data_ptr<int64_t>(),
                            blocks.data_ptr<int64_t>(), causal, offsets.data_ptr<int32_t>() + bh * n_qb * width,
                            counts.data_ptr<int32_t>() + bh * n_qb, width,
                            columns.data_ptr<int32_t>() + bh * n_qb * col_width, col_counts.data_ptr<int32_t>() + bh * n_qb,
                            col_width, block_n, S.get(), qt.data());
    }
    if constexpr (!std::is_same_v<T, float>) at::native::cpublas::brgemm_release(true);
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of, bool fp32_keys_ok = false) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "sample_scores_cpu: q must be fp32 or bf16, got ", dtype);
  const bool keys_ok = k.scalar_type() == dtype || (fp32_keys_ok && k.scalar_type() == at::kFloat);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && keys_ok && q.is_contiguous() && k.stride(3) == 1 &&
                  q.device().is_cpu() && k.device().is_cpu() && k.size(0) == q.size(0) && k.size(3) == q.size(3) &&
                  k.size(1) >= 1 && q.size(2) >= 1 && (dtype == at::kFloat || q.size(3) % 2 == 0),
              "sample_scores_cpu: q [B, Hs, n, D] contiguous and k [B, Hkv, Lk, D] (last dimension contiguous), one "
              "dtype (sample_scores: also a bf16 q with fp32 k), on the CPU; bf16 needs an even D");
  TORCH_CHECK(kv_of.scalar_type() == at::kLong && kv_of.is_contiguous() && kv_of.dim() == 1 &&
                  kv_of.size(0) == q.size(1),
              "sample_scores_cpu: kv_of must be contiguous int64 [Hs]");
}

}  // namespace

// q [B, Hs, R, D]: query rows of the chosen heads at key positions pos (int64 [R]), in the query blocks blocks
// (int64 [R]), scale folded in; k, kv_of as for sample_scores; the layout of those heads as SparseLayout's int32
// tensors [B, Hs, nQb(, width)].  Returns [B, Hs] fp32: the mean over the rows of the softmax mass (causal: keys up
// to the row's position) on the keys the layout lists for the row's query block.  Indices are bounded.
at::Tensor rows_kept_mass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of, const at::Tensor& pos,
                          const at::Tensor& blocks, bool causal, const at::Tensor& offsets, const at::Tensor& counts,
                          const at::Tensor& columns, const at::Tensor& col_counts, int64_t block_n) {
  check_inputs(q, k, kv_of);
  for (const at::Tensor* t : {&pos, &blocks})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1 && t->size(0) == q.size(2),
                "sample_scores_cpu: pos and blocks must be contiguous int64 [R]");
  for (const at::Tensor* t : {&offsets, &counts, &columns, &col_counts})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->size(0) == q.size(0) &&
                    t->size(1) == q.size(1),
                "sample_scores_cpu: layout tensors must be contiguous int32 [B, Hs, ...]");
  TORCH_CHECK(counts.dim() == 3 && col_counts.dim() == 3 && offsets.dim() == 4 && columns.dim() == 4 &&
                  offsets.size(2) == counts.size(2) && columns.size(2) == counts.size(2) &&
                  col_counts.size(2) == counts.size(2) && block_n >= 1,
              "sample_scores_cpu: counts [B, Hs, nQb], offsets and columns [B, Hs, nQb, width], block_n >= 1");
  const int64_t n_qb = counts.size(2);
  const int64_t* bp = blocks.data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(2); ++r)
    TORCH_CHECK(bp[r] >= 0 && bp[r] < n_qb, "sample_scores_cpu: blocks must index the layout's query blocks");
  auto out = at::zeros({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || q.size(2) == 0) return out;
  if (q.scalar_type() == at::kFloat)
    run_kept<float>(q, k, kv_of, pos, blocks, causal, offsets, counts, columns, col_counts, block_n, out);
  else
    run_kept<at::BFloat16>(q, k, kv_of, pos, blocks, causal, offsets, counts, columns, col_counts, block_n, out);
  return out;
}

// q [B, Hs, n, D]: the sample rows of the chosen heads, scale folded in; k [B, Hkv, Lk, D] (same dtype, fp32 or
// bf16, or fp32 keys for a bf16 q: converted per chunk; last dimension contiguous); kv_of, sink, local: int64 [Hs].  The rows sit at key positions pos0 .. pos0 + n - 1.
// Returns column, column_off_local, diagonal [B, Hs, Lk], by_group [B, Hs, Lk, G] (slot t: rows at distance
// pos - key >= 0 in diagonal group floor((pos0 - key) / group) + t) and lse [B, Hs, n] (fp32, natural log).
std::vector<at::Tensor> sample_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of,
                                      const at::Tensor& sink, const at::Tensor& local, int64_t pos0, bool causal,
                                      int64_t group) {
  check_inputs(q, k, kv_of, /*fp32_keys_ok=*/true);
  const auto dtype = q.scalar_type();
  const int64_t Hs = q.size(1), n = q.size(2);
  for (const at::Tensor* t : {&sink, &local})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1 && t->size(0) == Hs,
                "sample_scores_cpu: sink, local must be contiguous int64 [Hs]");
  TORCH_CHECK(group >= 1 && pos0 >= 0 && pos0 + n <= k.size(2),
              "sample_scores_cpu: group >= 1 and the rows' positions inside the keys");
  const int64_t B = q.size(0), Lk = k.size(2), G = (n + group - 2) / group + 1;
  auto f = q.options().dtype(at::kFloat);
  auto column = at::empty({B, Hs, Lk}, f), off_local = at::empty({B, Hs, Lk}, f), diagonal = at::empty({B, Hs, Lk}, f);
  auto by_group = at::empty({B, Hs, Lk, G}, f), lse = at::empty({B, Hs, n}, f);
  if (B * Hs * Lk > 0) {
    if (dtype == at::kFloat)
      run<float, float>(q, k, kv_of, sink, local, pos0, causal, group, G, column, off_local, diagonal, by_group, lse);
    else if (k.scalar_type() == at::kFloat)
      run<at::BFloat16, float>(q, k, kv_of, sink, local, pos0, causal, group, G, column, off_local, diagonal, by_group,
                               lse);
    else
      run<at::BFloat16, at::BFloat16>(q, k, kv_of, sink, local, pos0, causal, group, G, column, off_local, diagonal,
                                      by_group, lse);
  }
  return {column, off_local, diagonal, by_group, lse};
}

TORCH_LIBRARY(sparse_attn_cpu_scores, m) {
  m.def("sample_scores(Tensor q, Tensor k, Tensor kv_of, Tensor sink, Tensor local, int pos0, bool causal, "
        "int group) -> Tensor[]");
  m.impl("sample_scores", c10::DispatchKey::CPU, &sample_scores);
  m.def("rows_kept_mass(Tensor q, Tensor k, Tensor kv_of, Tensor pos, Tensor blocks, bool causal, Tensor offsets, "
        "Tensor counts, Tensor columns, Tensor col_counts, int block_n) -> Tensor");
  m.impl("rows_kept_mass", c10::DispatchKey::CPU, &rows_kept_mass);
}
