// Auto's early dense routing on the CPU (sparse_attn.patterns.auto._row_need): for each of the last n query rows of
// the chosen heads, the keys it needs for gamma of its softmax mass over every stride-th key, counted with the
// log-probability histogram of mass_histogram.h.  No [heads, n, Lk / stride] tensors and no op per step: per unit
// (the chosen heads of one KV head in one batch row, or a share of them), (1) per chunk of strided keys, scores
// S^T = K Q^T by one GEMM (the strided keys' rows read where they are: lda = stride x row stride), the causal
// mask, and the rows' running max and exp-sum while the chunk is in cache; (2) one pass over S^T filling every
// row's mass histogram (rows side by side, so consecutive updates hit different histograms) and its crossing
// bucket; (3) one vectorised pass counting the keys before and inside that bucket.
// One call from the query rows to each head's share: the sample is cut, scaled and typed here, the share computed
// here.  fp32 GEMMs, or bf16 GEMMs (fp32 accumulation) where the caller asks.  Readable definition: the torch path of
// _row_need (estimators.sample_mass.last_query_probs + estimators.mass_count.keys_for_mass).
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

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Histogram {
  float per_nat;
  int32_t buckets;
  float gamma;
};

// Pass 1 of a unit: S [K, N] = the scores of the K keys k (row stride ldk, key j at position j * stride) against
// the N columns of qt (Q^T, D rows; bf16: VNNI), -inf where causally hidden (row c sees keys j < lim[c]), and per
// row the log-sum-exp, from the running max and exp-sum of each chunk while it is in cache.
template <typename T, typename TK>
void scores(const T* qt, int64_t N, const TK* k, int64_t ldk, int64_t K, int64_t D, const std::vector<int64_t>& lim,
            float* S, float* lse) {
  constexpr bool kLow = !std::is_same_v<T, float>;
  const int64_t step = std::clamp<int64_t>(16384 / N / 16 * 16, 64, 256);
  const int64_t first_hidden = *std::min_element(lim.begin(), lim.end());
  std::vector<float> m(N, kNegInf), sum(N, 0.f), cm(N), cs(N);
  std::vector<T> kbuf(std::is_same_v<T, TK> ? 0 : step * D);
  for (int64_t j0 = 0; j0 < K; j0 += step) {
    const int64_t keys = std::min(step, K - j0);
    float* s0 = S + j0 * N;
    if constexpr (std::is_same_v<T, TK>) {
      at::native::cpublas::brgemm(keys, N, D, ldk, N, N, false, k + j0 * ldk, qt, s0, kLow);
    } else {  // another key type: this chunk's keys converted (no copy of all keys)
      for (int64_t i = 0; i < keys; ++i)
        for (int64_t d = 0; d < D; ++d) kbuf[i * D + d] = static_cast<T>(static_cast<float>(k[(j0 + i) * ldk + d]));
      at::native::cpublas::brgemm(keys, N, D, D, N, N, false, kbuf.data(), qt, s0, kLow);
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

// Passes 2 and 3 of a unit: each row's mass histogram (rows side by side, so consecutive updates hit different
// histograms; only the buckets mass_histogram::last_bucket says matter), its crossing bucket, and then, in a
// vectorised pass, the keys before and inside that bucket (no second histogram).  Writes out[c].
void count_keys(const float* S, const float* lse, int64_t N, int64_t K, const Histogram& h,
                const std::vector<float*>& out) {
  const int32_t last = mass_histogram::last_bucket(K, h.gamma, h.per_nat, h.buckets), width = last + 1;
  // slots and probabilities of kBlock keys at a time, vectorised, then added in: the scalar loads of the adds do
  // not wait on the vector stores just made
  constexpr int64_t kBlock = 16;
  std::vector<float> mass(N * width, 0.f), p(kBlock * N);
  std::vector<int32_t> slot(kBlock * N);
  for (int64_t j0 = 0; j0 < K; j0 += kBlock) {
    const int64_t keys = std::min(kBlock, K - j0);
    for (int64_t i = 0; i < keys; ++i) {
      const float* s = S + (j0 + i) * N;
      int32_t* sl = slot.data() + i * N;
      float* pr = p.data() + i * N;
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) {
        sl[c] = static_cast<int32_t>(c) * width + mass_histogram::bucket(s[c], lse[c], h.per_nat, last);
        pr[c] = exp_nonpositive(s[c] - lse[c]);
      }
    }
    for (int64_t e = 0; e < keys * N; ++e) mass[slot[e]] += p[e];
  }
  std::vector<mass_histogram::Crossing> cross(N);
  std::vector<int32_t> x(N), before(N, 0), in(N, 0);
  for (int64_t c = 0; c < N; ++c) {
    cross[c] = mass_histogram::crossing(mass.data() + c * width, width, h.gamma);
    x[c] = cross[c].x;
  }
  for (int64_t j = 0; j < K; ++j) {
    const float* s = S + j * N;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) {
      const int32_t b = mass_histogram::bucket(s[c], lse[c], h.per_nat, last);
      before[c] += b < x[c];
      in[c] += b == x[c];
    }
  }
  for (int64_t c = 0; c < N; ++c)
    *out[c] = mass_histogram::keys_needed(cross[c], static_cast<float>(before[c]), static_cast<float>(in[c]),
                                          h.gamma, K);
}

// One unit: rows[c] (c = head * n + r; D values, pre-scaled) at key position pos0 + r; K scored keys k (row stride
// ldk), key j at position j * stride.  Writes out[c].
template <typename T, typename TK>
void unit_keys(const std::vector<const T*>& rows, int64_t n, const TK* k, int64_t ldk, int64_t K, int64_t stride,
               int64_t D, int64_t pos0, bool causal, const Histogram& h, const std::vector<float*>& out) {
  constexpr bool kLow = !std::is_same_v<T, float>;
  const int64_t N = static_cast<int64_t>(rows.size());
  std::vector<T> qt(N * D);  // Q^T [D, N]; bf16: VNNI (element (d, c) at (d / 2) * 2N + 2c + d % 2)
  for (int64_t c = 0; c < N; ++c)
    for (int64_t d = 0; d < D; ++d) qt[kLow ? (d / 2) * 2 * N + 2 * c + d % 2 : d * N + c] = rows[c][d];
  std::vector<int64_t> lim(N);  // strided keys row c sees: j * stride <= its position
  for (int64_t c = 0; c < N; ++c) lim[c] = causal ? std::min(K, (pos0 + c % n) / stride + 1) : K;
  std::unique_ptr<float[]> S(new float[K * N]);  // uninitialised: pass 1 writes every entry
  std::vector<float> lse(N);
  scores<T, TK>(qt.data(), N, k, ldk, K, D, lim, S.get(), lse.data());
  count_keys(S.get(), lse.data(), N, K, h, out);
}

// Units: per batch row, the chosen heads of each KV head, split in parts where there are fewer groups than threads.
struct Unit {
  int64_t b, kvh;
  std::vector<int64_t> slots;
};

std::vector<Unit> units_of(int64_t B, int64_t Hs, int64_t Hkv, const std::vector<int64_t>& kv_of) {
  std::vector<std::vector<int64_t>> of_kv(Hkv);
  for (int64_t s = 0; s < Hs; ++s) of_kv[kv_of[s]].push_back(s);
  int64_t groups = 0;
  for (const auto& g : of_kv) groups += g.empty() ? 0 : B;
  const int64_t parts = std::max<int64_t>(1, (at::get_num_threads() + groups - 1) / std::max<int64_t>(groups, 1));
  std::vector<Unit> units;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      const auto& g = of_kv[kvh];
      const int64_t size = static_cast<int64_t>(g.size()), p = std::min(parts, size);
      for (int64_t i = 0; i < p; ++i)
        units.push_back({b, kvh, std::vector<int64_t>(g.begin() + i * size / p, g.begin() + (i + 1) * size / p)});
    }
  return units;
}

// sample [B, Hs, n, D] contiguous (the GEMM's type), keys [B, Hkv, K, D]: every unit's counts into needed [B, Hs, n].
template <typename T, typename TK>
void run(const at::Tensor& sample, const at::Tensor& keys, const std::vector<int64_t>& kv_of, int64_t stride,
         int64_t k_len, bool causal, const Histogram& h, at::Tensor& needed) {
  const int64_t B = sample.size(0), Hs = sample.size(1), n = sample.size(2), D = sample.size(3);
  const T* qp = sample.data_ptr<T>();
  const TK* kp = keys.data_ptr<TK>();
  float* op = needed.data_ptr<float>();
  const auto units = units_of(B, Hs, keys.size(1), kv_of);
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const Unit& unit = units[u];
      std::vector<const T*> rows;
      std::vector<float*> dst;
      for (int64_t s : unit.slots)
        for (int64_t r = 0; r < n; ++r) {
          rows.push_back(qp + ((unit.b * Hs + s) * n + r) * D);
          dst.push_back(op + (unit.b * Hs + s) * n + r);
        }
      unit_keys<T, TK>(rows, n, kp + unit.b * keys.stride(0) + unit.kvh * keys.stride(1), keys.stride(2),
                       keys.size(2), stride, D, k_len - n, causal, h, dst);
    }
    if constexpr (!std::is_same_v<T, float>) at::native::cpublas::brgemm_release(true);
  });
}

template <typename T>
void run_keys(const at::Tensor& sample, const at::Tensor& keys, const std::vector<int64_t>& kv_of, int64_t stride,
              int64_t k_len, bool causal, const Histogram& h, at::Tensor& needed) {
  switch (keys.scalar_type()) {
    case at::kFloat: return run<T, float>(sample, keys, kv_of, stride, k_len, causal, h, needed);
    case at::kBFloat16: return run<T, at::BFloat16>(sample, keys, kv_of, stride, k_len, causal, h, needed);
    default: return run<T, at::Half>(sample, keys, kv_of, stride, k_len, causal, h, needed);
  }
}

}  // namespace

// q [B, Hq, Lq, D] (fp32, bf16 or fp16, any strides): its last n rows of the query heads `heads` (int64 [Hs]) are
// scored, times scale; keys [B, Hkv, K, D] (fp32, bf16 or fp16, last dimension contiguous, any row stride): every
// stride-th of the k_len keys (K = ceil(k_len / stride)), e.g. a strided view of all keys; query head h reads KV
// head h / (Hq / Hkv).  The rows sit at key positions k_len - n .. k_len - 1.  bf16: GEMMs in bf16 (the scaled
// rows rounded, fp32 keys rounded a chunk at a time; fp32 accumulation), else fp32.  Returns
// needed [B, Hs, n] fp32: the keys among those that each row needs for gamma of its softmax mass over them
// (causal: the keys up to its position), as keys_for_mass counts them (buckets_per_nat buckets per unit of
// log-probability, n_buckets in all); and share [B, Hs]: the largest share of its visible keys a row needs.
std::vector<at::Tensor> row_need(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& heads, int64_t n,
                                 double scale, int64_t stride, int64_t k_len, bool causal, double gamma,
                                 int64_t buckets_per_nat, int64_t n_buckets, bool bf16) {
  const auto types = {at::kFloat, at::kBFloat16, at::kHalf};
  auto one_of = [&](at::ScalarType t) { return std::find(types.begin(), types.end(), t) != types.end(); };
  TORCH_CHECK(one_of(q.scalar_type()) && one_of(keys.scalar_type()),
              "row_need_cpu: q and keys must be fp32, bf16 or fp16, got ", q.scalar_type(), " and ",
              keys.scalar_type());
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && keys.stride(3) == 1 && q.device().is_cpu() &&
                  keys.device().is_cpu() && keys.size(0) == q.size(0) && keys.size(3) == q.size(3) &&
                  keys.size(1) >= 1 && q.size(1) % keys.size(1) == 0 && (!bf16 || q.size(3) % 2 == 0),
              "row_need_cpu: q [B, Hq, Lq, D] and keys [B, Hkv, K, D] (last dimension contiguous, Hq a multiple of "
              "Hkv) on the CPU; bf16 needs an even D");
  TORCH_CHECK(stride >= 1 && n >= 1 && n <= q.size(2) && n <= k_len && keys.size(2) == (k_len + stride - 1) / stride,
              "row_need_cpu: 1 <= n <= Lq, n <= k_len, and keys holding every stride-th of the k_len keys");
  TORCH_CHECK(heads.scalar_type() == at::kLong && heads.dim() == 1 && heads.device().is_cpu(),
              "row_need_cpu: heads must be an int64 [Hs] CPU tensor");
  const int64_t Hq = q.size(1), Hs = heads.size(0), group = Hq / keys.size(1);
  const auto hd = heads.contiguous();
  std::vector<int64_t> kv_of(Hs);
  for (int64_t s = 0; s < Hs; ++s) {
    const int64_t head = hd.data_ptr<int64_t>()[s];
    TORCH_CHECK(head >= 0 && head < Hq, "row_need_cpu: heads must index q's heads, got ", head);
    kv_of[s] = head / group;
  }
  TORCH_CHECK(buckets_per_nat >= 1 && n_buckets >= 1 && gamma > 0.0 && gamma <= 1.0,
              "row_need_cpu: buckets_per_nat, n_buckets >= 1 and gamma in (0, 1]");
  // the rows as the torch path scores them: fp32, times scale, then (bf16) rounded once
  auto sample = q.narrow(2, q.size(2) - n, n).index_select(1, hd).to(at::kFloat).mul_(scale);
  sample = sample.to(bf16 ? at::kBFloat16 : at::kFloat).contiguous();
  auto needed = at::empty({q.size(0), Hs, n}, q.options().dtype(at::kFloat));
  auto share = at::empty({q.size(0), Hs}, q.options().dtype(at::kFloat));
  if (share.numel() == 0) return {needed, share};
  const Histogram h{static_cast<float>(buckets_per_nat), static_cast<int32_t>(n_buckets), static_cast<float>(gamma)};
  if (bf16)
    run_keys<at::BFloat16>(sample, keys, kv_of, stride, k_len, causal, h, needed);
  else
    run_keys<float>(sample, keys, kv_of, stride, k_len, causal, h, needed);
  // share of its visible keys each row needs (as many as the torch path divides by), the largest per head
  const float* nd = needed.data_ptr<float>();
  float* sh = share.data_ptr<float>();
  for (int64_t bh = 0; bh < share.numel(); ++bh) {
    float top = -std::numeric_limits<float>::infinity();
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
        "float gamma, int buckets_per_nat, int n_buckets, bool bf16) -> Tensor[]");
  m.impl("row_need", c10::DispatchKey::CPU, &row_need);
}
