// Auto's early dense routing on the CPU (sparse_attn.patterns.auto._row_need): for each of the last n query rows of
// the chosen heads, the keys it needs for gamma of its softmax mass over every stride-th key, counted with the
// log-probability histogram of mass_histogram.h.  No [heads, n, Lk / stride] tensors and no op per step: per unit
// (the chosen heads of one KV head in one batch row, or a share of them), (1) per chunk of strided keys, scores
// S^T = K Q^T by one GEMM (the strided keys' rows read where they are: lda = stride x row stride), the causal
// mask, and the rows' running max and exp-sum while the chunk is in cache; (2) one pass over S^T filling every
// row's mass histogram (rows side by side, so consecutive updates hit different histograms) and its crossing
// bucket; (3) one vectorised pass counting the keys before and inside that bucket.
// fp32 GEMMs, or bf16 GEMMs (fp32 accumulation) where the caller asks.  Readable definition: the torch path of
// _row_need (estimators.sample_mass.last_query_probs + estimators.mass_count.keys_for_mass).
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
  std::vector<float> mass(N * width, 0.f), p(N);
  std::vector<int32_t> slot(N);
  for (int64_t j = 0; j < K; ++j) {
    const float* s = S + j * N;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) {
      slot[c] = static_cast<int32_t>(c) * width + mass_histogram::bucket(s[c], lse[c], h.per_nat, last);
      p[c] = exp_nonpositive(s[c] - lse[c]);
    }
    for (int64_t c = 0; c < N; ++c) mass[slot[c]] += p[c];
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
  std::vector<float> S(K * N), lse(N);
  scores<T, TK>(qt.data(), N, k, ldk, K, D, lim, S.data(), lse.data());
  count_keys(S.data(), lse.data(), N, K, h, out);
}

// Units: per batch row, the chosen heads of each KV head, split in parts where there are fewer groups than threads.
struct Unit {
  int64_t b, kvh;
  std::vector<int64_t> slots;
};

std::vector<Unit> units_of(int64_t B, int64_t Hs, int64_t Hkv, const int64_t* kv_of) {
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

template <typename T, typename TK>
void run(const at::Tensor& q, const at::Tensor& k, const int64_t* kv_of, int64_t stride, int64_t Lk, bool causal,
         const Histogram& h, at::Tensor& out) {
  const int64_t B = q.size(0), Hs = q.size(1), n = q.size(2), D = q.size(3), Hkv = k.size(1), K = k.size(2);
  const T* qp = q.data_ptr<T>();
  const TK* kp = k.data_ptr<TK>();
  float* op = out.data_ptr<float>();
  const auto units = units_of(B, Hs, Hkv, kv_of);
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
      unit_keys<T, TK>(rows, n, kp + unit.b * k.stride(0) + unit.kvh * k.stride(1), k.stride(2), K, stride, D,
                       Lk - n, causal, h, dst);
    }
    if constexpr (!std::is_same_v<T, float>) at::native::cpublas::brgemm_release(true);
  });
}

}  // namespace

// q [B, Hs, n, D] contiguous: the last n query rows of the chosen heads, scale folded in, fp32 or bf16 (the GEMM's
// type); keys [B, Hkv, K, D] (fp32, bf16 or fp16, last dimension contiguous, any row stride): every stride-th key of
// the k_len keys (K = ceil(k_len / stride)), e.g. a strided view of all keys; kv_of int64 [Hs] (each head's KV
// head).  The rows sit at key positions k_len - n .. k_len - 1.  Returns [B, Hs, n] fp32: the keys each row needs
// among those for gamma of its softmax mass over them (causal: the keys up to its position), as keys_for_mass
// counts them with buckets_per_nat buckets per unit of log-probability, n_buckets in all.
at::Tensor row_need_keys(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& kv_of, int64_t stride,
                         int64_t k_len, bool causal, double gamma, int64_t buckets_per_nat, int64_t n_buckets) {
  const auto qt = q.scalar_type(), kt = keys.scalar_type();
  TORCH_CHECK((qt == at::kFloat || qt == at::kBFloat16) &&
                  (kt == at::kFloat || kt == at::kBFloat16 || kt == at::kHalf),
              "row_need_cpu: q must be fp32 or bf16 and keys fp32, bf16 or fp16, got ", qt, " and ", kt);
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && q.is_contiguous() && keys.stride(3) == 1 && q.device().is_cpu() &&
                  keys.device().is_cpu() && keys.size(0) == q.size(0) && keys.size(3) == q.size(3) &&
                  keys.size(1) >= 1 && q.size(2) >= 1 && (qt == at::kFloat || q.size(3) % 2 == 0),
              "row_need_cpu: q [B, Hs, n, D] contiguous and keys [B, Hkv, K, D] (last dimension contiguous) on the "
              "CPU; bf16 needs an even D");
  TORCH_CHECK(stride >= 1 && q.size(2) <= k_len && keys.size(2) == (k_len + stride - 1) / stride,
              "row_need_cpu: keys must hold every stride-th of k_len >= n keys");
  TORCH_CHECK(kv_of.scalar_type() == at::kLong && kv_of.is_contiguous() && kv_of.dim() == 1 &&
                  kv_of.size(0) == q.size(1),
              "row_need_cpu: kv_of must be contiguous int64 [Hs]");
  const int64_t* kv = kv_of.data_ptr<int64_t>();
  for (int64_t s = 0; s < q.size(1); ++s)
    TORCH_CHECK(kv[s] >= 0 && kv[s] < keys.size(1), "row_need_cpu: kv_of must index the keys' heads");
  TORCH_CHECK(buckets_per_nat >= 1 && n_buckets >= 1 && gamma > 0.0 && gamma <= 1.0,
              "row_need_cpu: buckets_per_nat, n_buckets >= 1 and gamma in (0, 1]");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const Histogram h{static_cast<float>(buckets_per_nat), static_cast<int32_t>(n_buckets), static_cast<float>(gamma)};
  if (qt == at::kFloat) {
    if (kt == at::kFloat) run<float, float>(q, keys, kv, stride, k_len, causal, h, out);
    else if (kt == at::kBFloat16) run<float, at::BFloat16>(q, keys, kv, stride, k_len, causal, h, out);
    else run<float, at::Half>(q, keys, kv, stride, k_len, causal, h, out);
  } else {
    if (kt == at::kFloat) run<at::BFloat16, float>(q, keys, kv, stride, k_len, causal, h, out);
    else if (kt == at::kBFloat16) run<at::BFloat16, at::BFloat16>(q, keys, kv, stride, k_len, causal, h, out);
    else run<at::BFloat16, at::Half>(q, keys, kv, stride, k_len, causal, h, out);
  }
  return out;
}

TORCH_LIBRARY(sparse_attn_cpu_row_need, m) {
  m.def("row_need_keys(Tensor q, Tensor keys, Tensor kv_of, int stride, int k_len, bool causal, float gamma, "
        "int buckets_per_nat, int n_buckets) -> Tensor");
  m.impl("row_need_keys", c10::DispatchKey::CPU, &row_need_keys);
}
