// Fused CPU pass for the vertical-slash estimators' sample scores: the softmax of the last n queries against all keys,
// reduced to column mass, column mass off the local band, diagonal mass and column mass split by diagonal group,
// without a [heads, n, Lk] probability tensor (one [Lk, n] buffer per (batch row, head), reused; fp16 on the bf16
// route).  Per (batch row, head), two passes: (1) per chunk of keys, scores S^T = K Q^T by a batch-reduce GEMM (the
// keys' rows are read where they are: no transposed copy; fp32 keys for bf16 GEMMs rounded once per KV head), the
// causal mask on the last n keys, and, while the chunk is in cache, exp(score - chunk max) with the rows' running
// max and sum; (2) one pass over the keys that scales each row of S^T to probabilities and turns it into the
// reductions, 16 keys at a time where no special case applies (sample_reduce.h).  Also the mass a layout keeps of
// the softmax of any query rows (rows_kept_mass: the held-out rows on which Auto checks its candidates), without
// their [heads, rows, Lk] probabilities either.  fp32, or bf16 on the CPU's bf16 GEMMs (fp32 accumulation and softmax).
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
#include "bf16_convert.h"
#include "kept_mass.h"
#include "sample_reduce.h"
#include "work_units.h"
#include "vec16.h"

namespace {


// Q^T of the unit's rows (head i's n rows at rows[i], stride ldq) side by side: N = heads * n columns; bf16 in the
// VNNI layout (element (d, r) at (d / 2) * 2N + 2r + d % 2).
template <typename T>
void transpose_rows(const std::vector<const T*>& rows, int64_t ldq, int64_t n, int64_t D, T* qt) {
  constexpr bool kLow = !std::is_same_v<T, float>;
  const int64_t N = static_cast<int64_t>(rows.size()) * n;
  for (size_t i = 0; i < rows.size(); ++i)
    for (int64_t r = 0; r < n; ++r) {
      const int64_t c = static_cast<int64_t>(i) * n + r;
      for (int64_t d = 0; d < D; ++d) qt[kLow ? (d / 2) * 2 * N + 2 * c + d % 2 : d * N + c] = rows[i][r * ldq + d];
    }
}

// Scores of keys [j0, j0 + m) against the N rows into C [m, N] (key-major): the keys' rows read in place.
template <typename T>
void chunk_scores(const T* qt, const T* k, int64_t ldk, int64_t N, int64_t D, int64_t j0, int64_t m, float* C) {
  at::native::cpublas::brgemm(m, N, D, ldk, N, N, false, k + j0 * ldk, qt, C, !std::is_same_v<T, float>);
}

// What pass 1 leaves for pass 2 per (key, row): exp(score - chunk max), in [0, 1].  fp16 on the bf16-GEMM route:
// half the memory traffic of fp32 (at 64K a head's buffer is 16 MiB in fp32), relative error 2^-11, below the bf16
// scores' own; fp32 on the fp32 route (exact against the torch reference).
template <typename T>
struct StoredOf {
  using type = float;
};
#if VEC16_HALF
template <>
struct StoredOf<at::BFloat16> {
  using type = uint16_t;
};
#endif

// Softmax statistics kept per chunk, so that each chunk's scores become exp(score - chunk max) while still in cache
// (pass 1), and a row's probability is that times exp(chunk max - row max) / row sum (pass 2): two passes over the
// [Lk, rows] buffer instead of five.
struct ChunkSoftmax {
  int64_t n;
  std::vector<float> chunk_max, m, sum, csum;  // [chunks, n], [n], [n], [n]
  ChunkSoftmax(int64_t chunks, int64_t n_)
      : n(n_), chunk_max(chunks * n_, -std::numeric_limits<float>::infinity()),
        m(n_, -std::numeric_limits<float>::infinity()), sum(n_, 0.f), csum(n_) {}

  // Chunk c: its scores C [keys, n] (hidden entries already -inf) become exponentials in out [keys, n] (may be C
  // itself), statistics merged.
  template <typename Stored>
  void absorb(float* C, Stored* out, int64_t c, int64_t keys) {
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    float* cm = chunk_max.data() + c * n;
    float* cs = csum.data();
    if (n % 16 == 0 && n <= 16 * vec16::kMaxRowVectors) {
      chunk_exp<1>(C, out, cm, cs, keys);
    } else {
      chunk_exp_rows(C, cm, cs, keys);
      if (static_cast<void*>(out) != static_cast<void*>(C)) vec16::convert(C, out, keys * n);
    }
    for (int64_t r = 0; r < n; ++r) {
      if (cm[r] == ninf) continue;
      if (cm[r] > m[r]) {
        sum[r] = sum[r] * exp_nonpositive(m[r] - cm[r]) + cs[r];
        m[r] = cm[r];
      } else {
        sum[r] += cs[r] * exp_nonpositive(cm[r] - m[r]);
      }
    }
  }

  // n = 16 * NV rows: the chunk's maxima (cm), exponentials (into out) and their sums (cs), rows in registers.
  template <int NV, typename Stored>
  void chunk_exp(const float* C, Stored* out, float* cm, float* cs, int64_t keys) {
    if constexpr (NV < vec16::kMaxRowVectors)
      if (n != 16 * NV) return chunk_exp<NV + 1>(C, out, cm, cs, keys);
    using namespace vec16;
    v16 top[NV], total[NV] = {};
    for (int k = 0; k < NV; ++k) top[k] = splat(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < keys; ++j)
      for (int k = 0; k < NV; ++k) top[k] = max(top[k], load(C + j * n + 16 * k));
    for (int k = 0; k < NV; ++k) {
      store(cm + 16 * k, top[k]);
      top[k] = top[k] == -std::numeric_limits<float>::infinity() ? v16{} : top[k];  // a row the chunk hides: 0s
    }
    for (int64_t j = 0; j < keys; ++j)
      for (int k = 0; k < NV; ++k) {
        const v16 e = exp_nonpositive(load(C + j * n + 16 * k) - top[k]);
        store(out + j * n + 16 * k, e);
        total[k] += e;
      }
    for (int k = 0; k < NV; ++k) store(cs + 16 * k, total[k]);
  }

  // Any n: the same in place, row-vectorised plain loops.
  void chunk_exp_rows(float* C, float* cm, float* cs, int64_t keys) {
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < keys; ++j) {
      const float* s = C + j * n;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) cm[r] = s[r] > cm[r] ? s[r] : cm[r];
    }
    std::fill(cs, cs + n, 0.f);
    for (int64_t j = 0; j < keys; ++j) {
      float* s = C + j * n;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) {
        const float e = exp_nonpositive(s[r] - (cm[r] == ninf ? 0.f : cm[r]));  // -inf (hidden) gives 0
        s[r] = e;
        cs[r] += e;
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

// One unit of `sample_scores`: head i's n rows at q_rows[i] (pre-scaled), keys k [Lk, D] (stride ldk), rows at key
// positions pos0 .. pos0 + n - 1; out[i] says where head i's column, off_local, diagonal [Lk], by_group [Lk, G]
// go, lse[i] its [n].  Pass 1 scores a chunk of keys against every row of the unit and turns it into exponentials
// while it is in cache; pass 2 reduces each key's row of S, head by head (sample_reduce.h).
// S [Lk, N] holds pass 1's exponentials; C [chunk_keys(N), N] is the GEMM's fp32 output where S is fp16.
template <typename T, typename Stored>
void score_unit(const std::vector<const T*>& q_rows, int64_t ldq, const T* k, int64_t ldk, int64_t n, int64_t Lk,
                int64_t D, int64_t pos0, bool causal, Stored* S, float* C, T* qt,
                const std::vector<KeyOut>& out, const std::vector<float*>& lse) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t heads = static_cast<int64_t>(q_rows.size()), N = heads * n;
  transpose_rows(q_rows, ldq, n, D, qt);
  const int64_t step = chunk_keys(N), chunks = (Lk + step - 1) / step;
  ChunkSoftmax soft(chunks, N);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j0 = c * step, keys = std::min(step, Lk - j0);
    float* scores = C;
    if constexpr (std::is_same_v<Stored, float>) scores = S + j0 * N;  // exponentials in place
    chunk_scores<T>(qt, k, ldk, N, D, j0, keys, scores);
    if (causal)  // only the last n keys can lie after a sample row: key j hides it from rows r < j - pos0
      for (int64_t j = std::max<int64_t>(pos0 + 1, j0); j < j0 + keys; ++j)
        for (int64_t i = 0; i < heads; ++i)
          for (int64_t r = 0; r < std::min(n, j - pos0); ++r) scores[(j - j0) * N + i * n + r] = ninf;
    soft.absorb(scores, S + j0 * N, c, keys);
  }
  for (int64_t c = 0; c < N; ++c)
    lse[c / n][c % n] = soft.sum[c] > 0.f ? soft.m[c] + std::log(soft.sum[c]) : ninf;
  for (const KeyOut& o : out) {
    std::fill(o.diagonal, o.diagonal + Lk, 0.f);
    std::fill(o.by_group, o.by_group + Lk * o.G, 0.f);
  }
  std::vector<float> f(N), p(n), row(n);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j0 = c * step, keys = std::min(step, Lk - j0);
    soft.factors(c, f.data());
    for (int64_t i = 0; i < heads; ++i)
      for (int64_t j = j0; j < j0 + keys;) {
        if (j + 16 <= j0 + keys && bulk::is_bulk(j, n, out[i])) {
          bulk::reduce_bulk(S + j * N + i * n, N, f.data() + i * n, n, j, out[i]);
          j += 16;
        } else {
          const float* s;
          if constexpr (std::is_same_v<Stored, float>) {
            s = S + j * N + i * n;
          } else {
            vec16::convert(S + j * N + i * n, row.data(), n);
            s = row.data();
          }
          reduce_key(s, f.data() + i * n, p.data(), n, j, out[i]);
          ++j;
        }
      }
  }
}

// A unit's keys rounded to bf16: in a buffer each worker thread keeps across calls (up to kKeptBytes), because a
// fresh one per call measured about 10K page faults per call at 64K on 2 threads (glibc hands a worker arena's freed
// pages back to the OS); larger ones are allocated per call.
template <typename T>
struct RoundedKeys {
  static constexpr int64_t kKeptBytes = int64_t{64} << 20;
  std::unique_ptr<T[]> own;
  T* get(int64_t count) {
    if (count * static_cast<int64_t>(sizeof(T)) > kKeptBytes) {
      own.reset(new T[count]);
      return own.get();
    }
    static thread_local std::vector<T> kept;
    if (static_cast<int64_t>(kept.size()) < count) kept.resize(count);
    return kept.data();
  }
};

template <typename T, typename TK>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of, const at::Tensor& sink,
         const at::Tensor& local, int64_t pos0, bool causal, int64_t group, int64_t G,
         at::Tensor& column, at::Tensor& off_local, at::Tensor& diagonal, at::Tensor& by_group, at::Tensor& lse) {
  const int64_t B = q.size(0), Hs = q.size(1), n = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const T* qp = q.data_ptr<T>();
  const TK* kp = k.data_ptr<TK>();
  const int64_t* sk = sink.data_ptr<int64_t>();
  const int64_t* lc = local.data_ptr<int64_t>();
  float *col = column.data_ptr<float>(), *off = off_local.data_ptr<float>(), *dia = diagonal.data_ptr<float>(),
        *grp = by_group.data_ptr<float>(), *ls = lse.data_ptr<float>();
  const auto units = make_units(B, Hs, Hkv, kv_of.data_ptr<int64_t>());
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const Unit& unit = units[u];
      const int64_t heads = static_cast<int64_t>(unit.slots.size());
      std::vector<const T*> rows;
      std::vector<KeyOut> outs;
      std::vector<float*> lses;
      for (int64_t s : unit.slots) {
        const int64_t bh = unit.b * Hs + s;
        rows.push_back(qp + unit.b * q.stride(0) + s * q.stride(1));
        outs.push_back({col + bh * Lk, off + bh * Lk, dia + bh * Lk, grp + bh * Lk * G, Lk, sk[s], lc[s], group, G,
                        pos0});
        lses.push_back(ls + bh * n);
      }
      // One head at a time, so that its [Lk, n] scores stay in the last-level cache between the two passes.
      // (a buffer kept across calls instead measured slower: freeing this one raises glibc's mmap threshold, so
      // the torch ops after the pass reuse heap pages instead of faulting in fresh ones)
      using Stored = typename StoredOf<T>::type;
      std::unique_ptr<Stored[]> S(new Stored[Lk * n]);  // uninitialised: every entry read is written first
      std::vector<float> C(std::is_same_v<Stored, float> ? 0 : chunk_keys(n) * n);
      std::vector<T> qt(D * n);
      // fp32 keys for bf16 GEMMs: rounded once per unit, for all of its heads (rounded per head, the fp32 keys
      // were read from memory once per query head: 3-4 ms more per call at 32K on one thread)
      const TK* keys = kp + unit.b * k.stride(0) + unit.kvh * k.stride(1);
      const T* gemm_keys;
      int64_t ldk = k.stride(2);
      RoundedKeys<T> rounded;
      if constexpr (std::is_same_v<T, TK>) {
        gemm_keys = keys;
      } else {
        T* buffer = rounded.get(Lk * D);
        for (int64_t j = 0; j < Lk; ++j) bf16_convert::to_bf16(keys + j * ldk, buffer + j * D, D);
        gemm_keys = buffer;
        ldk = D;
      }
      for (int64_t i = 0; i < heads; ++i)
        score_unit<T, Stored>({rows[i]}, q.stride(2), gemm_keys, ldk, n, Lk, D, pos0, causal, S.get(), C.data(),
                              qt.data(), {outs[i]}, {lses[i]});
    }
    if constexpr (!std::is_same_v<T, float>) at::native::cpublas::brgemm_release(true);
  });
}

template <typename T, typename TK>
void run_kept(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of, const at::Tensor& pos,
              const at::Tensor& blocks, bool causal, const at::Tensor& offsets, const at::Tensor& counts,
              const at::Tensor& columns, const at::Tensor& col_counts, int64_t block_n, bool native, at::Tensor& out) {
  const int64_t B = q.size(0), Hs = q.size(1), R = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const int64_t n_qb = counts.size(2), width = offsets.size(3), col_width = columns.size(3);
  const T* qp = q.data_ptr<T>();
  const TK* kp = k.data_ptr<TK>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  const int64_t* bl = blocks.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // the rows by the keys they see (ascending), so the rows that see a chunk of keys are a suffix
  std::vector<int64_t> lim_of(R), order(R);
  for (int64_t r = 0; r < R; ++r) lim_of[r] = causal ? std::clamp<int64_t>(ps[r] + 1, 0, Lk) : Lk;
  for (int64_t r = 0; r < R; ++r) order[r] = r;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lim_of[a] < lim_of[b]; });
  const auto units = make_units(B, Hs, Hkv, kv_of.data_ptr<int64_t>());
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const Unit& unit = units[u];
      const int64_t heads = static_cast<int64_t>(unit.slots.size());
      kept_mass::RangeTable ranges;
      std::vector<int64_t> span_of(heads * n_qb, -1);  // per (head, query block), as needed
      std::vector<const T*> rows;
      std::vector<int64_t> lim, span;
      for (int64_t r : order)
        for (int64_t i = 0; i < heads; ++i) {
          const int64_t bh = unit.b * Hs + unit.slots[i], qb = bl[r], at = bh * n_qb + qb;
          int64_t& sp = span_of[i * n_qb + qb];
          if (sp < 0)
            sp = ranges.add(offsets.data_ptr<int32_t>() + at * width,
                            std::clamp<int64_t>(counts.data_ptr<int32_t>()[at], 0, width),
                            columns.data_ptr<int32_t>() + at * col_width,
                            std::clamp<int64_t>(col_counts.data_ptr<int32_t>()[at], 0, col_width), block_n, Lk);
          rows.push_back(qp + unit.b * q.stride(0) + unit.slots[i] * q.stride(1) + r * q.stride(2));
          lim.push_back(lim_of[r]);
          span.push_back(sp);
        }
      std::vector<float> mass(rows.size());
      kept_mass::rows_mass<T, TK>(rows, lim, ranges, span, kp + unit.b * k.stride(0) + unit.kvh * k.stride(1),
                              k.stride(2), Lk, D, mass.data(), native);
      for (int64_t i = 0; i < heads; ++i) {
        double total = 0.0;
        for (int64_t r = 0; r < R; ++r) total += mass[r * heads + i];
        op[unit.b * Hs + unit.slots[i]] = static_cast<float>(total / R);
      }
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
              "dtype (or a bf16 q with fp32 k), on the CPU; bf16 needs an even D");
  TORCH_CHECK(kv_of.scalar_type() == at::kLong && kv_of.is_contiguous() && kv_of.dim() == 1 &&
                  kv_of.size(0) == q.size(1),
              "sample_scores_cpu: kv_of must be contiguous int64 [Hs]");
}

}  // namespace

// q [B, Hs, R, D]: query rows of the chosen heads at key positions pos (int64 [R]), in the query blocks blocks
// (int64 [R]), scale folded in; k, kv_of as for sample_scores; the layout of those heads as SparseLayout's int32
// tensors [B, Hs, nQb(, width)].  Returns [B, Hs] fp32: the mean over the rows of the softmax mass (causal: keys up
// to the row's position) on the keys the layout lists for the row's query block.  Indices are bounded.  native:
// the AVX-512 / AVX512_BF16 code where the build has it (false: the portable loops, so tests check them anywhere).
at::Tensor rows_kept_mass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kv_of, const at::Tensor& pos,
                          const at::Tensor& blocks, bool causal, const at::Tensor& offsets, const at::Tensor& counts,
                          const at::Tensor& columns, const at::Tensor& col_counts, int64_t block_n, bool native) {
  check_inputs(q, k, kv_of, /*fp32_keys_ok=*/true);
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
    run_kept<float, float>(q, k, kv_of, pos, blocks, causal, offsets, counts, columns, col_counts, block_n, native,
                           out);
  else if (k.scalar_type() == at::kFloat)
    run_kept<at::BFloat16, float>(q, k, kv_of, pos, blocks, causal, offsets, counts, columns, col_counts, block_n,
                                  native, out);
  else
    run_kept<at::BFloat16, at::BFloat16>(q, k, kv_of, pos, blocks, causal, offsets, counts, columns, col_counts,
                                         block_n, native, out);
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
        "Tensor counts, Tensor columns, Tensor col_counts, int block_n, bool native=True) -> Tensor");
  m.impl("rows_kept_mass", c10::DispatchKey::CPU, &rows_kept_mass);
}
