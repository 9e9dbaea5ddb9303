// Auto's early dense routing on the CPU (sparse_attn.patterns.auto._row_need) in one call: for each of the last n
// query rows of the chosen heads, the keys it needs for gamma of its softmax mass over every stride-th key
// (counted with the log-probability histogram of mass_histogram.h), and per head the largest share of its visible
// keys a row needs.  No [heads, n, Lk / stride] tensors and no op per step: per unit (the chosen heads of one KV
// head in one batch row, or a share of them), (1) per chunk of strided keys, scores S^T = K Q^T by one fp32 GEMM
// (the strided keys' rows read where they are), the causal mask, and the rows' running max and exp-sum while the
// chunk is in cache; (2) the rows' counts from S^T (mass_histogram::keys_for_mass).  Readable definition: the
// torch path of _row_need (estimators.sample_mass.last_query_probs + estimators.mass_count.keys_for_mass).
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
#include "mass_histogram.h"
#include "work_units.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Pass 1 of a unit: S [K, N] = the scores of the K keys k (row stride ldk) against the N columns of qt (Q^T, D
// rows), -inf where causally hidden (row c sees keys j < lim[c]), and per row the log-sum-exp, from the running max
// and exp-sum of each chunk while it is in cache.  Keys of another type than fp32 are converted a chunk at a time.
template <typename TK>
void scores(const float* qt, int64_t N, const TK* k, int64_t ldk, int64_t K, int64_t D,
            const std::vector<int64_t>& lim, float* S, float* lse) {
  const int64_t step = chunk_keys(N);
  const int64_t first_hidden = *std::min_element(lim.begin(), lim.end());
  std::vector<float> m(N, kNegInf), sum(N, 0.f), cm(N), cs(N);
  std::vector<float> kbuf(std::is_same_v<TK, float> ? 0 : step * D);
  for (int64_t j0 = 0; j0 < K; j0 += step) {
    const int64_t keys = std::min(step, K - j0);
    float* s0 = S + j0 * N;
    if constexpr (std::is_same_v<TK, float>) {
      at::native::cpublas::brgemm(keys, N, D, ldk, N, N, false, k + j0 * ldk, qt, s0, false);
    } else {
      for (int64_t i = 0; i < keys; ++i)
        for (int64_t d = 0; d < D; ++d) kbuf[i * D + d] = static_cast<float>(k[(j0 + i) * ldk + d]);
      at::native::cpublas::brgemm(keys, N, D, D, N, N, false, kbuf.data(), qt, s0, false);
    }
    for (int64_t j = std::max(j0, first_hidden); j < j0 + keys; ++j)
      for (int64_t c = 0; c < N; ++c)
        if (j >= lim[c]) S[j * N + c] = kNegInf;
    std::fill(cm.begin(), cm.end(), kNegInf);
    for (int64_t j = 0; j < keys; ++j) {
      const float* s = s0 + j * N;
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) cm[c] = s[c] > cm[c] ? s[c] : cm[c];
    }
    for (int64_t c = 0; c < N; ++c) {  // key 0 is visible to every row: m is finite from the first chunk on
      const float m_new = std::max(m[c], cm[c]);
      sum[c] = m_new == kNegInf ? 0.f : sum[c] * exp_nonpositive(m[c] - m_new);
      m[c] = m_new;
    }
    std::fill(cs.begin(), cs.end(), 0.f);
    for (int64_t j = 0; j < keys; ++j) {
      const float* s = s0 + j * N;
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) cs[c] += exp_nonpositive(s[c] - m[c]);  // -inf (hidden) gives 0
    }
    for (int64_t c = 0; c < N; ++c) sum[c] += cs[c];
  }
  for (int64_t c = 0; c < N; ++c) lse[c] = m[c] + std::log(sum[c]);
}

struct Count {
  int64_t n, stride, pos0;  // rows per head, key stride, key position of row 0
  bool causal;
  float per_nat, gamma;
  int32_t n_buckets;
};

// One unit: rows[c] (c = head * n + r; D values, pre-scaled) at key position pos0 + r; K scored keys k (row stride
// ldk), key j at position j * stride.  Writes *out[c].
template <typename TK>
void unit_keys(const std::vector<const float*>& rows, const TK* k, int64_t ldk, int64_t K, int64_t D,
               const Count& w, const std::vector<float*>& out) {
  const int64_t N = static_cast<int64_t>(rows.size());
  std::vector<float> qt(N * D);  // Q^T [D, N]
  for (int64_t c = 0; c < N; ++c)
    for (int64_t d = 0; d < D; ++d) qt[d * N + c] = rows[c][d];
  std::vector<int64_t> lim(N);  // strided keys row c sees: j * stride <= its position
  for (int64_t c = 0; c < N; ++c) lim[c] = w.causal ? std::min(K, (w.pos0 + c % w.n) / w.stride + 1) : K;
  std::unique_ptr<float[]> S(new float[K * N]);  // uninitialised: pass 1 writes every entry
  std::vector<float> lse(N);
  scores<TK>(qt.data(), N, k, ldk, K, D, lim, S.get(), lse.data());
  mass_histogram::keys_for_mass(S.get(), lse.data(), N, K, w.per_nat, w.n_buckets, w.gamma, out.data());
}

// sample [B, Hs, n, D] fp32 contiguous, keys [B, Hkv, K, D]: every unit's counts into needed [B, Hs, n].
template <typename TK>
void run(const at::Tensor& sample, const at::Tensor& keys, const std::vector<int64_t>& kv_of, const Count& w,
         at::Tensor& needed) {
  const int64_t B = sample.size(0), Hs = sample.size(1), n = sample.size(2), D = sample.size(3);
  const float* qp = sample.data_ptr<float>();
  const TK* kp = keys.data_ptr<TK>();
  float* op = needed.data_ptr<float>();
  const auto units = make_units(B, Hs, keys.size(1), kv_of.data());
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const Unit& unit = units[u];
      std::vector<const float*> rows;
      std::vector<float*> dst;
      for (int64_t s : unit.slots)
        for (int64_t r = 0; r < n; ++r) {
          rows.push_back(qp + ((unit.b * Hs + s) * n + r) * D);
          dst.push_back(op + (unit.b * Hs + s) * n + r);
        }
      unit_keys<TK>(rows, kp + unit.b * keys.stride(0) + unit.kvh * keys.stride(1), keys.stride(2), keys.size(2),
                    D, w, dst);
    }
  });
}

}  // namespace

// q [B, Hq, Lq, D] (fp32, bf16 or fp16, any strides): its last n rows of the query heads `heads` (int64 [Hs]) are
// scored in fp32, times scale; keys [B, Hkv, K, D] (fp32, bf16 or fp16, last dimension contiguous, any row
// stride): every stride-th of the k_len keys (K = ceil(k_len / stride)), e.g. a strided view of all keys; query
// head h reads KV head h / (Hq / Hkv).  The rows sit at key positions k_len - n .. k_len - 1.  Returns needed
// [B, Hs, n] fp32: the keys among those that each row needs for gamma of its softmax mass over them (causal: the
// keys up to its position), as keys_for_mass counts them (buckets_per_nat buckets per unit of log-probability,
// n_buckets in all); and share [B, Hs]: the largest share of its visible keys a row of the head needs.
std::vector<at::Tensor> row_need(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& heads, int64_t n,
                                 double scale, int64_t stride, int64_t k_len, bool causal, double gamma,
                                 int64_t buckets_per_nat, int64_t n_buckets) {
  const auto types = {at::kFloat, at::kBFloat16, at::kHalf};
  auto one_of = [&](at::ScalarType t) { return std::find(types.begin(), types.end(), t) != types.end(); };
  TORCH_CHECK(one_of(q.scalar_type()) && one_of(keys.scalar_type()),
              "row_need_cpu: q and keys must be fp32, bf16 or fp16, got ", q.scalar_type(), " and ",
              keys.scalar_type());
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && keys.stride(3) == 1 && q.device().is_cpu() &&
                  keys.device().is_cpu() && keys.size(0) == q.size(0) && keys.size(3) == q.size(3) &&
                  keys.size(1) >= 1 && q.size(1) % keys.size(1) == 0,
              "row_need_cpu: q [B, Hq, Lq, D] and keys [B, Hkv, K, D] (last dimension contiguous, Hq a multiple of "
              "Hkv) on the CPU");
  TORCH_CHECK(stride >= 1 && n >= 1 && n <= q.size(2) && n <= k_len && keys.size(2) == (k_len + stride - 1) / stride,
              "row_need_cpu: 1 <= n <= Lq, n <= k_len, and keys holding every stride-th of the k_len keys");
  TORCH_CHECK(heads.scalar_type() == at::kLong && heads.dim() == 1 && heads.device().is_cpu(),
              "row_need_cpu: heads must be an int64 [Hs] CPU tensor");
  TORCH_CHECK(buckets_per_nat >= 1 && n_buckets >= 1 && gamma > 0.0 && gamma <= 1.0,
              "row_need_cpu: buckets_per_nat, n_buckets >= 1 and gamma in (0, 1]");
  const int64_t Hq = q.size(1), Hs = heads.size(0), group = Hq / keys.size(1);
  const auto hd = heads.contiguous();
  std::vector<int64_t> kv_of(Hs);
  for (int64_t s = 0; s < Hs; ++s) {
    const int64_t head = hd.data_ptr<int64_t>()[s];
    TORCH_CHECK(head >= 0 && head < Hq, "row_need_cpu: heads must index q's heads, got ", head);
    kv_of[s] = head / group;
  }
  // the rows as the torch path scores them: fp32, times scale
  const auto sample = q.narrow(2, q.size(2) - n, n).index_select(1, hd).to(at::kFloat).mul_(scale).contiguous();
  auto needed = at::empty({q.size(0), Hs, n}, q.options().dtype(at::kFloat));
  auto share = at::empty({q.size(0), Hs}, q.options().dtype(at::kFloat));
  if (share.numel() == 0) return {needed, share};
  const Count w{n, stride, k_len - n, causal, static_cast<float>(buckets_per_nat), static_cast<float>(gamma),
                static_cast<int32_t>(n_buckets)};
  switch (keys.scalar_type()) {
    case at::kFloat: run<float>(sample, keys, kv_of, w, needed); break;
    case at::kBFloat16: run<at::BFloat16>(sample, keys, kv_of, w, needed); break;
    default: run<at::Half>(sample, keys, kv_of, w, needed);
  }
  // each row's share of the strided keys it sees (as the torch path divides), the largest per head
  const float* nd = needed.data_ptr<float>();
  float* sh = share.data_ptr<float>();
  for (int64_t bh = 0; bh < share.numel(); ++bh) {
    float top = kNegInf;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t seen = causal ? k_len - n + r + 1 : k_len;
      top = std::max(top, nd[bh * n + r] / static_cast<float>((seen + stride - 1) / stride));
    }
    sh[bh] = top;
  }
  return {needed, share};
}

TORCH_LIBRARY(sparse_attn_cpu_row_need, m) {
  m.def("row_need(Tensor q, Tensor keys, Tensor heads, int n, float scale, int stride, int k_len, bool causal, "
        "float gamma, int buckets_per_nat, int n_buckets) -> Tensor[]");
  m.impl("row_need", c10::DispatchKey::CPU, &row_need);
}
