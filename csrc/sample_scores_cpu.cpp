// Fused CPU pass for the vertical-slash estimators' sample scores: the softmax of the last n queries against all keys,
// reduced to column mass, column mass off the local band, diagonal mass and column mass split by diagonal group,
// without a [heads, n, Lk] probability tensor (one [Lk, n] fp32 buffer per (batch row, head), reused in place).
// Per (batch row, head): scores S^T = K Q^T by batch-reduce GEMMs over chunks of keys (the keys' rows are read where
// they are: no transposed copy), the causal mask on the last n keys, a row max, exp in place with the row sums, then
// one pass over the keys that turns each row of S^T into the reductions.  Also the mass a layout keeps of the softmax
// of any query rows (rows_kept_mass: the held-out rows on which Auto checks its candidates), without their
// [heads, rows, Lk] probabilities either.  fp32, or bf16 on the
// CPU's bf16 GEMMs (fp32 accumulation and softmax).  Readable definition: sparse_attn.estimators.sample_mass.torch_sample_scores.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_exp.h"

namespace {

constexpr int64_t kChunk = 256;  // keys per GEMM call

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Scores stored key-major (``S[j * rows + r]``): each becomes exp(score - m[r]) in place, summed per row into sum.
inline void exp_rows_in_place(float* S, int64_t Lk, int64_t rows, const float* m, float* sum) {
  for (int64_t j = 0; j < Lk; ++j) {
    float* s = S + j * rows;
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) {
      const float e = exp_nonpositive(s[r] - m[r]);
      s[r] = e;
      sum[r] += e;
    }
  }
}

// S [Lk, n] = K Q^T for q [n, D] (rows, stride ldq) and k [Lk, D] (rows, stride ldk), by chunks of keys.
template <typename T>
void scores_transposed(const T* q, int64_t ldq, const T* k, int64_t ldk, int64_t n, int64_t Lk, int64_t D,
                       std::vector<float>& S, std::vector<T>& qt) {
  constexpr bool kLow = !std::is_same_v<T, float>;
  // B = Q^T [D, n] (bf16: VNNI, element (d, r) at (d / 2) * 2n + 2r + d % 2)
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < D; ++d) qt[kLow ? (d / 2) * 2 * n + 2 * r + d % 2 : d * n + r] = q[r * ldq + d];
  for (int64_t j0 = 0; j0 < Lk; j0 += kChunk)
    at::native::cpublas::brgemm(std::min(kChunk, Lk - j0), n, D, ldk, n, n, false, k + j0 * ldk, qt.data(),
                                S.data() + j0 * n, kLow);
}

// One (batch row, head) of `rows_kept_mass`: rows at key positions pos [R] (any order), each seeing keys
// [0, pos + 1) when causal, each in query block blocks[r] of a layout row (tiles at offsets[qb, :counts[qb]] of
// width block_n, single keys columns[qb, :col_counts[qb]]).  Returns the mean over the rows of the softmax mass
// on the layout's keys (a tile's mass is one difference of prefix sums, kept in S in place).
template <typename T>
float kept_head(const T* q, int64_t ldq, const T* k, int64_t ldk, int64_t R, int64_t Lk, int64_t D,
                const int64_t* pos, const int64_t* blocks, bool causal, const int32_t* offsets, const int32_t* counts,
                int64_t width, const int32_t* columns, const int32_t* col_counts, int64_t col_width, int64_t block_n,
                std::vector<float>& S, std::vector<T>& qt) {
  scores_transposed(q, ldq, k, ldk, R, Lk, D, S, qt);
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<int64_t> lim(R);
  for (int64_t r = 0; r < R; ++r) lim[r] = causal ? std::clamp<int64_t>(pos[r] + 1, 0, Lk) : Lk;
  std::vector<float> m(R, ninf), sum(R, 0.f);
  for (int64_t j = 0; j < Lk; ++j) {
    float* s = S.data() + j * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      s[r] = j < lim[r] ? s[r] : ninf;
      m[r] = s[r] > m[r] ? s[r] : m[r];
    }
  }
  exp_rows_in_place(S.data(), Lk, R, m.data(), sum.data());
  // S becomes each row's inclusive prefix sums of its probabilities, in place (rows side by side: vectorised)
  std::vector<float> run(R, 0.f);
  for (int64_t r = 0; r < R; ++r) sum[r] = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
  for (int64_t j = 0; j < Lk; ++j) {
    float* s = S.data() + j * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      run[r] += s[r] * sum[r];
      s[r] = run[r];
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
// pos0 .. pos0 + n - 1.  Writes column, off_local, diagonal [Lk], by_group [Lk, G], lse [n].
template <typename T>
void score_head(const T* q, int64_t ldq, const T* k, int64_t ldk, int64_t n, int64_t Lk, int64_t D, int64_t pos0,
                bool causal, int64_t sink, int64_t local, int64_t group, int64_t G, std::vector<float>& S,
                std::vector<T>& qt, float* column, float* off_local, float* diagonal, float* by_group, float* lse) {
  scores_transposed(q, ldq, k, ldk, n, Lk, D, S, qt);
  const float ninf = -std::numeric_limits<float>::infinity();
  if (causal)  // only the last n keys can lie after a sample row: key j hides it from rows r < j - pos0
    for (int64_t j = std::max<int64_t>(pos0 + 1, 0); j < Lk; ++j)
      for (int64_t r = 0; r < std::min(n, j - pos0); ++r) S[j * n + r] = ninf;
  std::vector<float> m(n, ninf), sum(n, 0.f), inv(n);
  for (int64_t j = 0; j < Lk; ++j) {
    const float* s = S.data() + j * n;
#pragma omp simd
    for (int64_t r = 0; r < n; ++r) m[r] = s[r] > m[r] ? s[r] : m[r];
  }
  exp_rows_in_place(S.data(), Lk, n, m.data(), sum.data());
  for (int64_t r = 0; r < n; ++r) {
    inv[r] = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
    lse[r] = sum[r] > 0.f ? m[r] + std::log(sum[r]) : ninf;
  }
  std::fill(diagonal, diagonal + Lk, 0.f);
  std::fill(by_group, by_group + Lk * G, 0.f);
  for (int64_t j = 0; j < Lk; ++j) {
    float* p = S.data() + j * n;
    float col = 0.f;
#pragma omp simd reduction(+ : col)
    for (int64_t r = 0; r < n; ++r) {
      p[r] *= inv[r];
      col += p[r];
    }
    const int64_t d0 = pos0 - j;                            // distance of row 0 to key j; row r: d0 + r
    const int64_t r_lo = std::clamp<int64_t>(-d0, 0, n);    // first row at distance >= 0
    float near = 0.f;
    for (int64_t r = r_lo; r < std::clamp<int64_t>(local - d0, 0, n); ++r) near += p[r];
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
      float mass = 0.f;
      for (int64_t i = r; i < end; ++i) mass += p[i];
      by_group[j * G + (g - g0)] += mass;
      r = end;
    }
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of, const at::Tensor& sink,
         const at::Tensor& local, int64_t pos0, bool causal, int64_t group, int64_t G, at::Tensor& column,
         at::Tensor& off_local, at::Tensor& diagonal, at::Tensor& by_group, at::Tensor& lse) {
  const int64_t B = q.size(0), Hs = q.size(1), n = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const int64_t* kv = kv_of.data_ptr<int64_t>();
  const int64_t* sk = sink.data_ptr<int64_t>();
  const int64_t* lc = local.data_ptr<int64_t>();
  float *col = column.data_ptr<float>(), *off = off_local.data_ptr<float>(), *dia = diagonal.data_ptr<float>(),
        *grp = by_group.data_ptr<float>(), *ls = lse.data_ptr<float>();
  at::parallel_for(0, B * Hs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(Lk * n);
    std::vector<T> qt(D * n);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hs, h = bh % Hs, kvh = std::clamp<int64_t>(kv[h], 0, Hkv - 1);
      score_head<T>(qp + b * q.stride(0) + h * q.stride(1), q.stride(2), kp + b * k.stride(0) + kvh * k.stride(1),
                    k.stride(2), n, Lk, D, pos0, causal, sk[h], lc[h], group, G, S, qt, col + bh * Lk, off + bh * Lk,
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
    std::vector<float> S(Lk * R);
    std::vector<T> qt(D * R);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hs, h = bh % Hs, kvh = std::clamp<int64_t>(kv[h], 0, Hkv - 1);
      op[bh] = kept_head<T>(qp + b * q.stride(0) + h * q.stride(1), q.stride(2),
                            kp + b * k.stride(0) + kvh * k.stride(1), k.stride(2), R, Lk, D, pos.data_ptr<int64_t>(),
                            blocks.data_ptr<int64_t>(), causal, offsets.data_ptr<int32_t>() + bh * n_qb * width,
                            counts.data_ptr<int32_t>() + bh * n_qb, width,
                            columns.data_ptr<int32_t>() + bh * n_qb * col_width, col_counts.data_ptr<int32_t>() + bh * n_qb,
                            col_width, block_n, S, qt);
    }
    if constexpr (!std::is_same_v<T, float>) at::native::cpublas::brgemm_release(true);
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "sample_scores_cpu: q must be fp32 or bf16, got ", dtype);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.scalar_type() == dtype && q.is_contiguous() && k.stride(3) == 1 &&
                  q.device().is_cpu() && k.device().is_cpu() && k.size(0) == q.size(0) && k.size(3) == q.size(3) &&
                  k.size(1) >= 1 && q.size(2) >= 1 && (dtype == at::kFloat || q.size(3) % 2 == 0),
              "sample_scores_cpu: q [B, Hs, n, D] contiguous and k [B, Hkv, Lk, D] (last dimension contiguous), one "
              "dtype, on the CPU; bf16 needs an even D");
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
// bf16, last dimension contiguous); kv_of, sink, local: int64 [Hs].  The rows sit at key positions pos0 .. pos0 + n - 1.
// Returns column, column_off_local, diagonal [B, Hs, Lk], by_group [B, Hs, Lk, G] (slot t: rows at distance
// pos - key >= 0 in diagonal group floor((pos0 - key) / group) + t) and lse [B, Hs, n] (fp32, natural log).
std::vector<at::Tensor> sample_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of,
                                      const at::Tensor& sink, const at::Tensor& local, int64_t pos0, bool causal,
                                      int64_t group) {
  check_inputs(q, k, kv_of);
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
      run<float>(q, k, kv_of, sink, local, pos0, causal, group, G, column, off_local, diagonal, by_group, lse);
    else
      run<at::BFloat16>(q, k, kv_of, sink, local, pos0, causal, group, G, column, off_local, diagonal, by_group, lse);
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
