// Work units of the CPU estimate passes (sample_scores_cpu.cpp, row_need_cpu.cpp): per batch row, the chosen query
// heads of one KV head (all of them, or a share where there are fewer (batch row, KV head) pairs than threads),
// handled by one thread, so a key chunk is read once for the heads that share it; and their key chunks.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

struct Unit {
  int64_t b, kvh;
  std::vector<int64_t> slots;  // indices into the chosen heads
};

// kv_of[s]: the KV head of chosen head s (clamped into [0, Hkv)).
inline std::vector<Unit> make_units(int64_t B, int64_t Hs, int64_t Hkv, const int64_t* kv_of) {
  std::vector<std::vector<int64_t>> of_kv(Hkv);
  for (int64_t s = 0; s < Hs; ++s) of_kv[std::clamp<int64_t>(kv_of[s], 0, Hkv - 1)].push_back(s);
  int64_t groups = 0;
  for (const auto& g : of_kv) groups += g.empty() ? 0 : B;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t parts = std::max<int64_t>(1, (threads + std::max<int64_t>(groups, 1) - 1) / std::max<int64_t>(groups, 1));
  std::vector<Unit> units;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      const auto& g = of_kv[kvh];
      const int64_t m = static_cast<int64_t>(g.size()), p = std::min(parts, m);
      for (int64_t i = 0; i < p; ++i)
        units.push_back({b, kvh, std::vector<int64_t>(g.begin() + i * m / p, g.begin() + (i + 1) * m / p)});
    }
  return units;
}

// Keys per GEMM call of a unit's rows: about 64 KiB of fp32 scores per chunk (so a chunk is still in cache when its
// softmax steps run), 64 to 256 keys.
inline int64_t chunk_keys(int64_t rows) {
  return std::clamp<int64_t>((16384 / std::max<int64_t>(rows, 1)) / 16 * 16, 64, 256);
}
