// Sparse attention over a SparseLayout on the CPU in fp32.  Each query block scores its tiles' keys in place (a
// batch-reduce GEMM on the transposed keys, no gather), masks causally per element only where a tile crosses a
// row's position, takes one softmax over all its keys and multiplies with the values in place.  Only the few
// single columns are gathered.  Compiled on first use by sparse_attn/ops/cpu_kernel.py; the readable definition
// is sparse_attn.ops.reference.reference_attention with SparseLayout.to_mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

struct Run {  // keys [start, start + width) scored into columns [slot, slot + width) of the block's scores
  int64_t start, width, slot;
};

// C[M, N] = A[M, K] B[K, N] (+ C when accumulate); row-major with leading dimensions.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

// x[i] = exp(x[i] - shift) for n values, -inf giving 0; returns their sum.  Cody-Waite reduction and a degree-7
// polynomial (relative error about 1e-7), written so the compiler vectorises it.
inline float exp_shifted_sum(float* x, int64_t n, float shift) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const float y = x[i] - shift;
    const float z = std::max(y, -87.0f);
    const float t = z * 1.44269504088896341f;
    const float nf = (t + 12582912.0f) - 12582912.0f;  // round to nearest
    const float r = (z - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(float));
    const float e = y < -87.0f ? 0.0f : p * scale;
    x[i] = e;
    total += e;
  }
  return total;
}

inline float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

}  // namespace

// q [B, Hq, Lq, D]; k_t [B, Hkv, D, ldk] (keys transposed, row stride ldk >= Lk); v [B, Hkv, Lk, D]; fp32, contiguous.
// offsets [B, Hq, nQb, T] int32 (first key of each block_n-wide tile, any order) with counts [B, Hq, nQb] int32;
// columns [B, Hq, nQb, C] int32 with col_counts [B, Hq, nQb] int32; max_keys >= every block's listed keys.
// Returns out [B, Hq, Lq, D] and lse [B, Hq, Lq] (-inf and a zero row where a row sees no key).
std::vector<at::Tensor> sparse_attention(const at::Tensor& q, const at::Tensor& k_t, const at::Tensor& v,
                                         const at::Tensor& offsets, const at::Tensor& counts,
                                         const at::Tensor& columns, const at::Tensor& col_counts, int64_t block_m,
                                         int64_t block_n, bool causal, double scale, int64_t max_keys) {
  for (const at::Tensor* t : {&q, &k_t, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "sparse_attention_cpu: q, k_t, v must be contiguous fp32 CPU tensors");
  for (const at::Tensor* t : {&offsets, &counts, &columns, &col_counts})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "sparse_attention_cpu: layout tensors must be "
                "contiguous int32");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = v.size(1), Lk = v.size(2), ldk = k_t.size(3), group = Hq / Hkv;
  const int64_t n_qb = offsets.size(2), T = offsets.size(3), C = columns.size(3);
  TORCH_CHECK(D >= 1 && block_m >= 1 && block_n >= 1, "sparse_attention_cpu: head_dim, block_m, block_n must be >= 1");
  // per-thread buffers hold one block's rows: no more than Lq however large block_m is
  const int64_t bm = std::min(block_m, Lq);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, Hq, Lq}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* ktp = k_t.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int32_t* offp = offsets.data_ptr<int32_t>();
  const int32_t* cntp = counts.data_ptr<int32_t>();
  const int32_t* colp = columns.data_ptr<int32_t>();
  const int32_t* ccntp = col_counts.data_ptr<int32_t>();
  float* outp = out.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  const int64_t W = std::max<int64_t>(max_keys, 1), Cw = std::max<int64_t>(C, 1);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  const int64_t n_blocks = B * Hq * n_qb;
  // blocks differ in work (later blocks see more keys): hand them out one at a time
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    std::vector<float> qs(bm * D), S(bm * W), O(bm * D), kc_t(D * Cw), vc(Cw * D), row_sum(bm);
    std::vector<int32_t> tiles(std::max<int64_t>(T, 1)), col_keys(Cw);
    std::vector<Run> runs;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t bh = blk / n_qb, row0 = (blk % n_qb) * block_m;
      const int64_t kv = (bh / Hq) * Hkv + (bh % Hq) / group;
      const int64_t rows = std::min(block_m, Lq - row0);
      const int64_t first = row0 + (Lk - Lq);                       // key position of row 0
      const int64_t key_end = causal ? std::min(Lk, first + rows) : Lk;  // no row sees a key from here on
      const float* ktk = ktp + kv * D * ldk;
      const float* vk = vp + kv * Lk * D;
      const float* qblk = qp + (bh * Lq + row0) * D;
      const float sc = static_cast<float>(scale);
      for (int64_t i = 0; i < rows * D; ++i) qs[i] = qblk[i] * sc;

      // tiles sorted, merged into runs of consecutive keys and cut at key_end
      const int64_t nt = cntp[blk];
      std::copy(offp + blk * T, offp + blk * T + nt, tiles.begin());
      std::sort(tiles.begin(), tiles.begin() + nt);
      runs.clear();
      int64_t used = 0;
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t start = tiles[t], stop = std::min<int64_t>(start + block_n, key_end);
        if (stop <= start) continue;
        if (!runs.empty() && runs.back().start + runs.back().width == start)
          runs.back().width += stop - start;
        else
          runs.push_back({start, stop - start, used});
        used += stop - start;
      }
      const int64_t tile_keys = used;
      // the columns some row can see, gathered: keys transposed for the scores, values as rows
      int64_t nc = 0;
      for (int64_t c = 0; c < ccntp[blk]; ++c) {
        const int64_t key = colp[blk * C + c];
        if (key < key_end) col_keys[nc++] = static_cast<int32_t>(key);
      }
      for (int64_t d = 0; d < D; ++d) {
        const float* row = ktk + d * ldk;
        float* dst = kc_t.data() + d * nc;
        for (int64_t c = 0; c < nc; ++c) dst[c] = row[col_keys[c]];
      }
      for (int64_t c = 0; c < nc; ++c) std::memcpy(vc.data() + c * D, vk + col_keys[c] * D, D * sizeof(float));
      used += nc;

      for (const Run& r : runs) gemm(rows, r.width, D, qs.data(), D, ktk + r.start, ldk, S.data() + r.slot, W, false);
      if (nc) gemm(rows, nc, D, qs.data(), D, kc_t.data(), nc, S.data() + tile_keys, W, false);
      if (causal) {  // row i sees keys <= first + i: only runs and columns past `first` need a look
        for (const Run& r : runs) {
          if (r.start + r.width - 1 <= first) continue;
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = std::max<int64_t>(0, first + i + 1 - r.start); j < r.width; ++j)
              S[i * W + r.slot + j] = neg_inf;
        }
        for (int64_t c = 0; c < nc; ++c)
          for (int64_t i = 0; i < std::min<int64_t>(rows, col_keys[c] - first); ++i)
            S[i * W + tile_keys + c] = neg_inf;
      }

      for (int64_t i = 0; i < rows; ++i) {
        float* s = S.data() + i * W;
        const float m = used ? row_max(s, used) : neg_inf;
        if (m == neg_inf) {  // no visible key: zero weights, zero output, lse -inf
          std::fill(s, s + used, 0.f);
          row_sum[i] = 0.f;
          lsep[bh * Lq + row0 + i] = neg_inf;
          continue;
        }
        row_sum[i] = exp_shifted_sum(s, used, m);
        lsep[bh * Lq + row0 + i] = m + std::log(row_sum[i]);
      }
      bool accumulate = false;
      for (const Run& r : runs) {
        gemm(rows, D, r.width, S.data() + r.slot, W, vk + r.start * D, D, O.data(), D, accumulate);
        accumulate = true;
      }
      if (nc) {
        gemm(rows, D, nc, S.data() + tile_keys, W, vc.data(), D, O.data(), D, accumulate);
        accumulate = true;
      }
      if (!accumulate) std::fill(O.begin(), O.begin() + rows * D, 0.f);
      float* o = outp + (bh * Lq + row0) * D;
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
        for (int64_t d = 0; d < D; ++d) o[i * D + d] = O[i * D + d] * inv;
      }
    }
  }
  return {out, lse};
}

TORCH_LIBRARY(sparse_attn_cpu, m) {
  m.def("sparse_attention(Tensor q, Tensor k_t, Tensor v, Tensor offsets, Tensor counts, Tensor columns, "
        "Tensor col_counts, int block_m, int block_n, bool causal, float scale, int max_keys) -> Tensor[]");
  m.impl("sparse_attention", c10::DispatchKey::CPU, &sparse_attention);
}
