// Sparse attention over a SparseLayout on the CPU.  Each query block scores its tiles' keys in place (a
// batch-reduce GEMM on a transposed copy of the keys, no gather), masks per element only where a run of keys
// crosses a row's position or its edge, takes the softmax and multiplies with the values in place; a block that
// sees more keys than a segment takes them segment by segment with an online softmax, so its scores stay in L2.  Only the few single columns are gathered, from the keys' rows (one contiguous read per column).
// Two element types: fp32 (fp32 GEMMs), and bf16/fp16 where this CPU has the low-precision batch-reduce GEMM
// (keys and values in the GEMM's VNNI layout, key pairs interleaved; probabilities rounded to the input type
// before the value GEMM, as flash attention does; fp32 accumulation and softmax).  Every index read is bounded:
// counts are clamped to the index width and keys outside [0, Lk) are skipped, so a bad layout passed with
// check_layout=False gives garbage numbers, never a crash.  Compiled on first use by sparse_attn/ops/cpu_kernel.py;
// the readable definition is sparse_attn.ops.reference.reference_attention with SparseLayout.to_mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "cpu_exp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

struct Run {  // keys [start, start + width) scored into columns [slot, slot + width) of the block's scores;
  int64_t start, width, slot;  // only keys [lo, hi) count, the rest (VNNI pair padding) are masked
  int64_t lo, hi;
};

// C[M, N] = A[M, K] B[K, N] (+ C when accumulate), row-major with leading dimensions; for bf16/fp16 B is in the
// VNNI layout (element (k, n) at B[(k / 2) * 2 * ldb + 2 * n + k % 2]) and K is even.
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/!std::is_same_v<T, float>);
}

// x[i] *= scale, then with softcap > 0: x[i] = softcap * tanh(x[i] / softcap), tanh(a) = sign(a) (1 - e) / (1 + e)
// with e = exp(-2 |a|) (no cancellation for large |a|; absolute error about 1e-7 near 0).
inline void scale_and_cap(float* x, int64_t n, float scale, float softcap) {
  if (softcap > 0.f) {
    const float inv = scale / softcap;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float a = x[i] * inv;
      const float e = exp_nonpositive(-2.f * std::fabs(a));
      x[i] = std::copysign(softcap * (1.f - e) / (1.f + e), a);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] *= scale;
  }
}

inline float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return std::min(std::max(x, lo), hi); }

// Strides of a [B, H, L, D] tensor whose last dimension is contiguous.
struct Strides {
  int64_t b, h, l;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), l(t.stride(2)) {}
};

// q [B, Hq, Lq, D], k [B, Hkv, Lk, D] (rows, for the single columns): any strides, last dimension contiguous.
// k_t: keys transposed, [B, Hkv, D, ldk] for fp32, [B, Hkv, D / 2, ldk, 2] (VNNI) for bf16/fp16, contiguous;
// v: [B, Hkv, Lk, D] rows (last dimension contiguous) for fp32, [B, Hkv, ldk / 2, D, 2] (VNNI) for bf16/fp16.
// The VNNI copies hold zeros past Lk.  Layout as SparseLayout (int32, contiguous).
template <typename T>
void run_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_t, const at::Tensor& v,
                const at::Tensor& offsets, const at::Tensor& counts, const at::Tensor& columns,
                const at::Tensor& col_counts, int64_t block_m, int64_t block_n, bool causal, float scale,
                float softcap, int64_t segment, at::Tensor& out, at::Tensor& lse) {
  constexpr bool kLow = !std::is_same_v<T, float>;
  constexpr int64_t kPair = kLow ? 2 : 1;  // keys per VNNI group: runs and column sets are padded to this
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), ldk = k_t.size(3), group = Hq / Hkv;
  const int64_t n_qb = offsets.size(2), max_tiles = offsets.size(3), C = columns.size(3);
  const Strides sq(q), sk(k), sv(v), so(out);
  const int64_t bm = std::min(block_m, Lq);  // per-thread buffers hold one block's rows: at most Lq
  const int64_t tile = std::min(block_n, Lk);
  // every key slot a block can use: its runs (each padded by at most one pair) and its columns (padded)
  const int64_t W = std::max<int64_t>(max_tiles * (tile + 2 * kPair) + C + kPair, 1), Cw = C + kPair;
  // Keys scored at once: a block that sees more than `segment` keys takes them in segments with an online softmax,
  // so its scores stay in the core's L2 (64 rows x 1024 keys x 4 bytes = 256 KiB) instead of one [rows, all keys]
  // buffer.  Buffer width: all of a block's keys when they fit, else a segment (a run piece of at most `segment`
  // keys plus a tile and pair padding, or all columns).
  const int64_t Ws = std::min(W, std::max(segment + tile + 2 * kPair, Cw));
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* ktp = k_t.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int32_t* offp = offsets.data_ptr<int32_t>();
  const int32_t* cntp = counts.data_ptr<int32_t>();
  const int32_t* colp = columns.data_ptr<int32_t>();
  const int32_t* ccntp = col_counts.data_ptr<int32_t>();
  T* outp = out.data_ptr<T>();
  float* lsep = lse.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t kt_head = k_t.stride(1), v_head = kLow ? v.stride(1) : 0;

  const int64_t n_blocks = B * Hq * n_qb;
  // blocks differ in work (later blocks see more keys): hand them out one at a time
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    std::vector<float> S(bm * Ws), O(bm * D), row_sum(bm), row_max_run(bm), kc_f;  // kc_f: fp32 columns, transposed
    std::vector<T> P(kLow ? bm * Ws : 0), kc(kLow ? D * Cw : 0), vc(Cw * D);  // kc: VNNI columns
    if (!kLow) kc_f.resize(D * Cw);
    std::vector<int32_t> tiles(std::max<int64_t>(max_tiles, 1)), col_keys(Cw);
    std::vector<Run> runs;
    std::vector<size_t> seg_end;  // runs [seg_end[s - 1], seg_end[s]) form segment s; the columns join the last
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t bh = blk / n_qb, b = bh / Hq, h = bh % Hq, row0 = (blk % n_qb) * block_m;
      const int64_t kv = b * Hkv + h / group;
      const int64_t rows = std::min(block_m, Lq - row0);
      const int64_t first = row0 + (Lk - Lq);                           // key position of row 0
      const int64_t key_end = causal ? std::min(Lk, first + rows) : Lk;  // no row sees a key from here on
      const T* kt = ktp + kv * kt_head;
      const T* krows = kp + b * sk.b + (h / group) * sk.h;
      const T* vrows = vp + b * sv.b + (h / group) * sv.h;
      const T* vv = vp + kv * v_head;
      const T* qblk = qp + b * sq.b + h * sq.h + row0 * sq.l;

      // tiles clipped to [0, key_end), sorted, merged into runs of consecutive keys, padded to whole key pairs
      const int64_t nt = clamp(cntp[blk], 0, max_tiles);
      int64_t n_valid = 0;
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t start = offp[blk * max_tiles + t];
        if (start < key_end && start + tile > 0) tiles[n_valid++] = static_cast<int32_t>(start);
      }
      std::sort(tiles.begin(), tiles.begin() + n_valid);
      runs.clear();
      for (int64_t t = 0; t < n_valid; ++t) {
        const int64_t lo = std::max<int64_t>(tiles[t], 0), hi = std::min<int64_t>(tiles[t] + tile, key_end);
        if (hi <= lo) continue;
        if (!runs.empty() && runs.back().hi == lo && lo - runs.back().lo < segment)
          runs.back().hi = hi;  // merged, but no run grows past a segment
        else
          runs.push_back({lo, 0, 0, lo, hi});
      }
      // runs padded to whole key pairs and packed into segments of at most Ws scored keys
      seg_end.clear();
      int64_t used = 0;
      for (Run& r : runs) {
        r.start = r.lo - r.lo % kPair;
        r.width = r.hi + (r.hi % kPair) - r.start;  // even for VNNI: the zero pair past Lk is in the copies
        if (used + r.width > Ws) {
          seg_end.push_back(&r - runs.data());
          used = 0;
        }
        r.slot = used;
        used += r.width;
      }
      // the columns some row can see, gathered from the key rows: transposed (fp32) or VNNI (bf16/fp16)
      int64_t nc = 0;
      const int64_t ncc = clamp(ccntp[blk], 0, C);
      for (int64_t c = 0; c < ncc; ++c) {
        const int64_t key = colp[blk * C + c];
        if (key >= 0 && key < key_end) col_keys[nc++] = static_cast<int32_t>(key);
      }
      const int64_t ncp = nc + nc % kPair;  // padded with a zero key, masked below
      if (used + ncp > Ws) {  // the columns get a segment of their own
        seg_end.push_back(runs.size());
        used = 0;
      }
      const int64_t col_slot = used;
      seg_end.push_back(runs.size());
      if constexpr (kLow) {
        for (int64_t c = 0; c < ncp; ++c) {
          const int64_t key = c < nc ? col_keys[c] : 0;
          const T* krow = krows + key * sk.l;
          const T* vpair = vv + (key / 2) * 2 * D + key % 2;  // the key's values inside the VNNI copy
          for (int64_t d = 0; d < D; ++d) {
            kc[(d / 2) * 2 * ncp + 2 * c + d % 2] = c < nc ? krow[d] : T(0.f);
            vc[(c / 2) * 2 * D + 2 * d + c % 2] = c < nc ? vpair[2 * d] : T(0.f);
          }
        }
      } else {
        for (int64_t c = 0; c < nc; ++c) {
          const float* krow = krows + col_keys[c] * sk.l;
          for (int64_t d = 0; d < D; ++d) kc_f[d * nc + c] = krow[d];
          std::memcpy(vc.data() + c * D, vrows + col_keys[c] * sv.l, D * sizeof(float));
        }
      }

      // Online softmax over the segments (flash attention's recurrence): a block seeing many keys keeps its scores
      // in cache instead of one [rows, all keys] buffer; a block whose keys fit one segment takes one pass.
      std::fill(row_max_run.begin(), row_max_run.begin() + rows, neg_inf);
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.f);
      bool accumulate = false;
      size_t first_run = 0;
      for (size_t seg = 0; seg < seg_end.size(); ++seg) {
        const size_t last_run = seg_end[seg];
        const bool with_cols = seg + 1 == seg_end.size() && ncp > 0;
        int64_t width = with_cols ? col_slot + ncp : 0;
        for (size_t ri = first_run; ri < last_run; ++ri) width = std::max(width, runs[ri].slot + runs[ri].width);
        if (width == 0) {
          first_run = last_run;
          continue;
        }
        for (size_t ri = first_run; ri < last_run; ++ri) {
          const Run& r = runs[ri];
          gemm<T>(rows, r.width, D, qblk, sq.l, kt + r.start * kPair, ldk, S.data() + r.slot, Ws, false);
        }
        if (with_cols) {
          if constexpr (kLow)
            gemm<T>(rows, ncp, D, qblk, sq.l, kc.data(), ncp, S.data() + col_slot, Ws, false);
          else
            gemm<T>(rows, nc, D, qblk, sq.l, kc_f.data(), nc, S.data() + col_slot, Ws, false);
        }
        for (int64_t i = 0; i < rows; ++i) scale_and_cap(S.data() + i * Ws, width, scale, softcap);
        // masks: pair padding, and with causal row i sees keys <= first + i (only runs past `first` need a look)
        for (size_t ri = first_run; ri < last_run; ++ri) {
          const Run& r = runs[ri];
          const bool crosses = causal && r.hi - 1 > first;
          if (r.lo == r.start && r.hi == r.start + r.width && !crosses) continue;
          for (int64_t i = 0; i < rows; ++i) {
            float* s = S.data() + i * Ws + r.slot;
            const int64_t hi = causal ? std::min(r.hi, first + i + 1) : r.hi;
            std::fill(s, s + (r.lo - r.start), neg_inf);
            std::fill(s + std::max(hi, r.lo) - r.start, s + r.width, neg_inf);
          }
        }
        if (with_cols)
          for (int64_t c = 0; c < ncp; ++c) {
            const int64_t hidden = c < nc ? (causal ? clamp(col_keys[c] - first, 0, rows) : 0) : rows;
            for (int64_t i = 0; i < hidden; ++i) S[i * Ws + col_slot + c] = neg_inf;
          }
        for (int64_t i = 0; i < rows; ++i) {
          float* s = S.data() + i * Ws;
          const float m = std::max(row_max_run[i], row_max(s, width));
          if (m == neg_inf) {  // no visible key yet: zero weights
            std::fill(s, s + width, 0.f);
          } else {
            const float rescale = exp_nonpositive(row_max_run[i] - m);  // 0 when nothing was seen before
            row_sum[i] = row_sum[i] * rescale + exp_shifted_sum(s, width, m);
            row_max_run[i] = m;
            if (accumulate && rescale != 1.f)
              for (int64_t d = 0; d < D; ++d) O[i * D + d] *= rescale;
          }
          if constexpr (kLow) {
            T* p = P.data() + i * Ws;
            for (int64_t j = 0; j < width; ++j) p[j] = T(s[j]);
          }
        }
        for (size_t ri = first_run; ri < last_run; ++ri) {
          const Run& r = runs[ri];
          if constexpr (kLow)
            gemm<T>(rows, D, r.width, P.data() + r.slot, Ws, vv + (r.start / 2) * 2 * D, D, O.data(), D, accumulate);
          else
            gemm<T>(rows, D, r.width, S.data() + r.slot, Ws, vrows + r.start * sv.l, sv.l, O.data(), D, accumulate);
          accumulate = true;
        }
        if (with_cols) {
          if constexpr (kLow)
            gemm<T>(rows, D, ncp, P.data() + col_slot, Ws, vc.data(), D, O.data(), D, accumulate);
          else
            gemm<T>(rows, D, nc, S.data() + col_slot, Ws, vc.data(), D, O.data(), D, accumulate);
          accumulate = true;
        }
        first_run = last_run;
      }
      if (!accumulate) std::fill(O.begin(), O.begin() + rows * D, 0.f);
      for (int64_t i = 0; i < rows; ++i)
        lsep[bh * Lq + row0 + i] = row_sum[i] > 0.f ? row_max_run[i] + std::log(row_sum[i]) : neg_inf;
      T* o = outp + b * so.b + h * so.h + row0 * so.l;
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
        for (int64_t d = 0; d < D; ++d) o[i * so.l + d] = static_cast<T>(O[i * D + d] * inv);
      }
    }
    if constexpr (kLow) at::native::cpublas::brgemm_release(true);
  }
}

}  // namespace

// See run_blocks for the tensors.  Returns out [B, Hq, Lq, D] (q's dtype; contiguous, or `out_arg` itself when given:
// any strides with the last dimension contiguous, e.g. an engine's [tokens, Hq, D] output buffer viewed as BHLD, so no
// result is allocated and copied) and lse [B, Hq, Lq] fp32 (-inf and a zero row where a row sees no key).  softcap > 0: scores become softcap * tanh(score / softcap)
// (after the scale, before mask and softmax).
std::vector<at::Tensor> sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_t,
                                         const at::Tensor& v, const at::Tensor& offsets, const at::Tensor& counts,
                                         const at::Tensor& columns, const at::Tensor& col_counts, int64_t block_m,
                                         int64_t block_n, bool causal, double scale, double softcap,
                                         int64_t segment_keys, const std::optional<at::Tensor>& out_arg) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "sparse_attention_cpu: q must be fp32, bf16 or fp16, got ", dtype);
  for (const at::Tensor* t : {&q, &k, &k_t, &v})
    TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu() && t->dim() >= 4 && t->stride(-1) == 1,
                "sparse_attention_cpu: q, k, k_t, v must be CPU tensors of one dtype, last dimension contiguous");
  TORCH_CHECK(k_t.is_contiguous(), "sparse_attention_cpu: k_t must be contiguous");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.size(0) == q.size(0) && k.size(3) == q.size(3) &&
                  k.size(1) >= 1 && q.size(1) % k.size(1) == 0 && k.size(2) >= q.size(2),
              "sparse_attention_cpu: q [B, Hq, Lq, D] and k [B, Hkv, Lk, D] with Hq % Hkv == 0 and Lq <= Lk");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(D >= 1 && block_m >= 1 && block_n >= 1 && segment_keys >= 1,
              "sparse_attention_cpu: head_dim, block_m, block_n and segment_keys must be >= 1");
  if (dtype == at::kFloat) {
    TORCH_CHECK(k_t.dim() == 4 && k_t.size(0) == B && k_t.size(1) == Hkv && k_t.size(2) == D && k_t.size(3) >= Lk &&
                    v.dim() == 4 && v.sizes() == k.sizes(),
                "sparse_attention_cpu: fp32 wants k_t [B, Hkv, D, >= Lk] and v shaped like k");
  } else {
    TORCH_CHECK(D % 2 == 0, "sparse_attention_cpu: bf16/fp16 need an even head_dim");
    TORCH_CHECK(k_t.dim() == 5 && k_t.size(0) == B && k_t.size(1) == Hkv && k_t.size(2) == D / 2 &&
                    k_t.size(3) >= Lk + Lk % 2 && k_t.size(3) % 2 == 0 && k_t.size(4) == 2 && v.is_contiguous() &&
                    v.dim() == 5 && v.size(0) == B && v.size(1) == Hkv && 2 * v.size(2) >= Lk + Lk % 2 &&
                    v.size(3) == D && v.size(4) == 2,
                "sparse_attention_cpu: bf16/fp16 want VNNI copies k_t [B, Hkv, D / 2, even >= Lk, 2] and v "
                "[B, Hkv, >= Lk / 2, D, 2]");
  }
  const int64_t n_qb = (Lq + block_m - 1) / block_m;
  for (const at::Tensor* t : {&offsets, &counts, &columns, &col_counts})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device().is_cpu() && t->dim() >= 3 &&
                    t->size(0) == B && t->size(1) == Hq && t->size(2) == n_qb,
                "sparse_attention_cpu: layout tensors must be contiguous int32 CPU tensors [B, Hq, ceil(Lq / "
                "block_m), ...]");
  TORCH_CHECK(counts.dim() == 3 && col_counts.dim() == 3 && offsets.dim() == 4 && columns.dim() == 4,
              "sparse_attention_cpu: counts [B, Hq, nQb], offsets and columns [B, Hq, nQb, width]");
  if (out_arg)
    TORCH_CHECK(out_arg->sizes() == q.sizes() && out_arg->scalar_type() == dtype && out_arg->device().is_cpu() &&
                    out_arg->stride(-1) == 1,
                "sparse_attention_cpu: out must be a CPU tensor shaped and typed like q, last dimension contiguous");
  auto out = out_arg ? *out_arg : at::empty(q.sizes(), q.options());
  auto lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  if (dtype == at::kFloat)
    run_blocks<float>(q, k, k_t, v, offsets, counts, columns, col_counts, block_m, block_n, causal, sc, cap,
                      segment_keys, out, lse);
  else if (dtype == at::kBFloat16)
    run_blocks<at::BFloat16>(q, k, k_t, v, offsets, counts, columns, col_counts, block_m, block_n, causal, sc, cap,
                             segment_keys, out, lse);
  else
    run_blocks<at::Half>(q, k, k_t, v, offsets, counts, columns, col_counts, block_m, block_n, causal, sc, cap,
                         segment_keys, out, lse);
  return {out, lse};
}

// Whether this CPU runs the batch-reduce GEMM natively in `dtype` (bf16/fp16 VNNI); elsewhere the caller computes
// in fp32.
// A probe, not a feature flag: torch's could_pack() answers for AMX only, and the GEMM throws (fp16 without
// AVX512-FP16) or might not match elsewhere, so one small product is run and checked exactly.
template <typename T>
bool probe_low_precision_gemm() {
  constexpr int64_t M = 3, N = 16, K = 4;
  std::vector<T> A(M * K), B(K * N);
  std::vector<float> C(M * N, -1.f);
  for (int64_t i = 0; i < M * K; ++i) A[i] = T(static_cast<float>(i % 5) - 2.f);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) B[(k / 2) * 2 * N + 2 * n + k % 2] = T(static_cast<float>((k + n) % 3) - 1.f);
  try {
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, A.data(), B.data(), C.data(), true);
    at::native::cpublas::brgemm_release(true);
  } catch (const std::exception&) {
    return false;
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float want = 0.f;
      for (int64_t k = 0; k < K; ++k) want += static_cast<float>(A[m * K + k]) * static_cast<float>((k + n) % 3 - 1);
      if (C[m * N + n] != want) return false;
    }
  return true;
}

bool low_precision_gemm(at::ScalarType dtype) {
  if (dtype == at::kBFloat16) return probe_low_precision_gemm<at::BFloat16>();
  if (dtype == at::kHalf) return probe_low_precision_gemm<at::Half>();
  return false;
}

TORCH_LIBRARY(sparse_attn_cpu, m) {
  m.def("sparse_attention(Tensor q, Tensor k, Tensor k_t, Tensor v, Tensor offsets, Tensor counts, Tensor columns, "
        "Tensor col_counts, int block_m, int block_n, bool causal, float scale, float softcap, "
        "int segment_keys, Tensor(a!)? out=None) -> Tensor[]");
  m.impl("sparse_attention", c10::DispatchKey::CPU, &sparse_attention);
  m.def("low_precision_gemm(ScalarType dtype) -> bool", &low_precision_gemm);
}
