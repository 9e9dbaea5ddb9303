// The vertical-slash layout on the CPU: from the sample's column and diagonal-group masses and per-head budgets to
// the SparseLayout index tensors, in one pass per (batch row, head) (at::parallel_for), without the [B, h, Lk]
// temporaries, top-k and sorts of the torch path.  Readable definition (and the path on other devices):
// sparse_attn/patterns/vertical_slash.py (`_choose`, `_cheapest_slashes`, `_top_within`, the compaction and the
// starts / ends / columns of `VerticalSlash.build`) and sparse_attn/patterns/base.py (`layout_from_ranges`).  The
// result is the torch path's, tensor for tensor: entries are ranked by the same tie-free key (value, then the lower
// index first), and the gamma budgets are summed as torch sums them (cumulative sums in double, rounded to fp32).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// `vertical_slash.order_key`: a float's order as a signed int32 (negative floats flipped), above 32 bits of
// (2^32 - 1 - index): larger key = larger value, or the same value at a lower index.  No two entries tie.
inline int64_t order_key(float value, int64_t index) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if (bits < 0) bits ^= 0x7FFFFFFF;
  return static_cast<int64_t>(bits) * (int64_t(1) << 32) + (int64_t(0xFFFFFFFF) - index);
}
inline int64_t key_index(int64_t key) { return int64_t(0xFFFFFFFF) - (key & int64_t(0xFFFFFFFF)); }

// The `top` largest keys of `keys`, sorted descending, in place at its front (fewer where it is shorter).
inline int64_t top_sorted(std::vector<int64_t>& keys, int64_t top) {
  top = std::min<int64_t>(top, keys.size());
  if (top < static_cast<int64_t>(keys.size()))
    std::nth_element(keys.begin(), keys.begin() + top, keys.end(), std::greater<int64_t>());
  std::sort(keys.begin(), keys.begin() + top, std::greater<int64_t>());
  return top;
}

struct Params {
  int64_t B, h, Lk, Lq, nB, G, pos0, block_m, block_n, width_v, width_s;
  bool gamma_mode, causal;
};

// Per (batch row, head): kept columns (ascending) and kept diagonal groups.
struct HeadChoice {
  std::vector<int64_t> columns, groups;
};

// Entries ranked by `order_key`, produced best first without sorting them all: a counting sort into bins of the
// key's top bits (bins descend as keys do), then each bin sorted only when the walk reaches it.  The walks below
// stop after a small share of the entries (the columns and groups holding gamma of the mass, the top width_v
// columns), so this costs two passes over the entries where a top-k or sort of all of them cost several.
class Ranked {
 public:
  static constexpr int kBins = 2048;

  explicit Ranked(const std::vector<int64_t>& keys) : keys_(keys.size()), start_(kBins + 1, 0) {
    for (const int64_t key : keys) ++start_[bin(key) + 1];
    for (int b = 0; b < kBins; ++b) start_[b + 1] += start_[b];
    std::vector<int64_t> fill(start_.begin(), start_.end() - 1);
    for (const int64_t key : keys) keys_[fill[bin(key)]++] = key;
    next_bin_ = kBins - 1;
  }

  // The next key in descending order; false once all are out.
  bool next(int64_t& key) {
    while (at_ == end_) {
      if (next_bin_ < 0) return false;
      at_ = start_[next_bin_], end_ = start_[next_bin_ + 1];
      std::sort(keys_.begin() + at_, keys_.begin() + end_, std::greater<int64_t>());
      --next_bin_;
    }
    key = keys_[at_++];
    return true;
  }

 private:
  // Negative values in bin 0, the others by their top 11 ordered bits (sign clear): monotone in the key.
  static int bin(int64_t key) {
    const int32_t ordered = static_cast<int32_t>(key >> 32);
    return ordered < 0 ? 0 : (ordered >> 20) + 1;
  }

  std::vector<int64_t> keys_;
  std::vector<int64_t> start_;
  int64_t at_ = 0, end_ = 0;
  int next_bin_;
};

HeadChoice choose_head(const float* col_all, const float* col, const float* group_mass, const float* by_group,
                       int64_t sink, int64_t local, int64_t vertical, int64_t min_vertical, int64_t slash,
                       int64_t min_slash, float target, const Params& p) {
  const int64_t Lk = p.Lk, nB = p.nB;
  const float inf = std::numeric_limits<float>::infinity();
  HeadChoice out;
  // One ranking of the columns (cost 1 key) and, with gamma, the diagonal groups by mass per key (cost block_n):
  // `_cheapest_slashes` walks it until the mass before an entry reaches `target`; the columns come out in the
  // order `_top_within(col, force_v, ...)` ranks them (same values, same keys).
  std::vector<int64_t> keys(Lk + (p.gamma_mode ? nB : 0));
  for (int64_t j = 0; j < Lk; ++j) keys[j] = order_key(j < sink ? inf : col[j], j);
  if (p.gamma_mode)
    for (int64_t g = 0; g < nB; ++g)
      keys[Lk + g] = order_key(g * p.block_n < local ? inf : group_mass[g] / static_cast<float>(p.block_n), Lk + g);
  Ranked ranked(keys);
  const int64_t width_v = std::min(p.width_v, Lk);
  std::vector<int64_t> columns;                      // the top width_v columns, best first
  columns.reserve(width_v);
  std::vector<char> chosen_s(nB, 0);
  bool walking = p.gamma_mode;
  double acc = 0.0;
  for (int64_t key; (walking || static_cast<int64_t>(columns.size()) < width_v) && ranked.next(key);) {
    const int64_t e = key_index(key);
    if (e < Lk && static_cast<int64_t>(columns.size()) < width_v) columns.push_back(e);
    if (walking) {
      const float mass = e < Lk ? col[e] : group_mass[e - Lk];
      acc += mass;
      const float before = static_cast<float>(acc) - mass;   // torch: cumsum (double inside, fp32 out) - mass
      if (!(before < target)) walking = false;
      else if (e >= Lk) chosen_s[e - Lk] = 1;
    }
  }
  // Diagonal groups: `_top_within(group_mass, force_s, slash, min_slash, chosen_s, width_s)`.
  std::vector<int64_t> group_keys(nB);
  for (int64_t g = 0; g < nB; ++g) group_keys[g] = order_key(g * p.block_n < local ? inf : group_mass[g], g);
  const int64_t width_s = top_sorted(group_keys, std::min(p.width_s, nB));
  std::vector<char> picked(nB, 0);
  for (int64_t r = 0; r < width_s; ++r) {
    const int64_t g = key_index(group_keys[r]);
    const bool forced = g * p.block_n < local;
    if (r < slash && (!p.gamma_mode || chosen_s[g] || forced || r < min_slash)) {
      out.groups.push_back(g);
      picked[g] = 1;
    }
  }
  // Columns: rank < vertical and (with gamma) chosen while the mass no picked diagonal holds
  // (`GroupedScores.on_diagonals`: key j's slot t lies in group floor((pos0 - j) / block_n) + t) stays below
  // target minus the mass the picked diagonals cover.
  auto on_picked = [&](int64_t j) {
    const int64_t g0 = floor_div(p.pos0 - j, p.block_n);
    const float* slots = by_group + j * p.G;
    float on = 0.f;
    for (int64_t t = 0; t < p.G; ++t) {
      const int64_t g = g0 + t;
      on += (g >= 0 && g < nB && picked[g]) ? slots[t] : 0.f;
    }
    return on;
  };
  float threshold = 0.f;
  if (p.gamma_mode) {
    // Covered mass: the per-key fp32 masses summed in double (the torch path sums them in fp64 too, so any order
    // rounds to the same fp32).
    // Only keys a picked group crosses hold any (group g: slot g - g0(j) of keys j in
    // [pos0 - (g + 1) block_n + 1, pos0 - (g - G + 1) block_n]); each key once, groups from the nearest.
    double covered = 0.0;
    int64_t done = -1;                                 // keys up to here are summed
    for (int64_t g = nB - 1; g >= 0; --g) {
      if (!picked[g]) continue;
      const int64_t lo = std::max<int64_t>({p.pos0 - (g + 1) * p.block_n + 1, done + 1, 0});
      const int64_t hi = std::min<int64_t>(p.pos0 - (g - p.G + 1) * p.block_n, Lk - 1);
      for (int64_t j = lo; j <= hi; ++j) covered += on_picked(j);
      done = std::max(done, hi);
    }
    threshold = target - static_cast<float>(covered);
  }
  acc = 0.0;
  for (int64_t r = 0; r < static_cast<int64_t>(columns.size()); ++r) {
    const int64_t j = columns[r];
    bool keep = r < vertical;
    if (p.gamma_mode) {
      const float mass = col_all[j] - on_picked(j);
      acc += mass;
      keep = keep && (static_cast<float>(acc) - mass < threshold || j < sink || r < min_vertical);
    }
    if (keep) out.columns.push_back(j);
  }
  std::sort(out.columns.begin(), out.columns.end());
  // Groups by distance, farthest first: their key ranges then start in ascending order in every query block.
  std::sort(out.groups.begin(), out.groups.end(), std::greater<int64_t>());
  return out;
}

// `layout_from_ranges` of one (batch row, head): per query block, the merged tiles of its groups' key ranges and the
// columns (visible, outside the tiles).
void write_head(const HeadChoice& c, const Params& p, int64_t max_tiles, int32_t* count, int32_t* offsets,
                int32_t* col_count, int32_t* col_index, int64_t n_v) {
  const int64_t n_qb = (p.Lq + p.block_m - 1) / p.block_m, shift = p.Lk - p.Lq, bn = p.block_n;
  const auto& columns = c.columns;
  std::vector<std::pair<int64_t, int64_t>> covered;    // the key intervals this block's tiles cover, ascending
  for (int64_t m = 0; m < n_qb; ++m) {
    const int64_t first = m * p.block_m + shift, last = std::min((m + 1) * p.block_m, p.Lq) - 1 + shift;
    int32_t* off = offsets + m * max_tiles;
    int64_t n_tiles = 0;
    int64_t run_start = 0, run_end = 0;
    bool open = false;
    covered.clear();
    auto flush = [&]() {      // a merged run's tiles, start to end (the last may reach past it), up to max_tiles
      const int64_t from = n_tiles;
      for (int64_t o = run_start; o < run_end && n_tiles < max_tiles; o += bn) off[n_tiles++] = static_cast<int32_t>(o);
      if (n_tiles > from) covered.emplace_back(run_start, off[n_tiles - 1] + bn);
    };
    for (const int64_t g : c.groups) {
      const int64_t d0 = g * bn;
      const int64_t s = std::max<int64_t>(first - d0 - bn + 1, 0), e = std::min<int64_t>(last - d0 + 1, p.Lk);
      if (e <= s) continue;
      if (open && s < run_end + bn) {
        run_end = std::max(run_end, e);
      } else {
        if (open) flush();
        run_start = s, run_end = e, open = true;
      }
    }
    if (open) flush();
    std::fill(off + n_tiles, off + max_tiles, 0);
    count[m] = static_cast<int32_t>(n_tiles);
    // Columns ascending up to the block's last visible key, less those inside the covered intervals: copied in
    // the stretches between them.
    const auto end = p.causal ? std::upper_bound(columns.begin(), columns.end(), last) : columns.end();
    int32_t* cols = col_index + m * n_v;
    int32_t* out = cols;
    auto from = columns.begin();
    for (const auto& [a, b] : covered) {
      const auto stop = std::min(std::lower_bound(from, end, a), end);
      out = std::copy(from, stop, out);
      from = std::max(std::lower_bound(stop, end, b), stop);
    }
    if (from < end) out = std::copy(from, end, out);
    std::fill(out, cols + n_v, 0);
    col_count[m] = static_cast<int32_t>(out - cols);
  }
}

void check_float(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && !t.is_cuda() && t.sizes() == shape,
              "vertical_slash_layout_cpu: ", name, " must be contiguous fp32 of shape ", shape, ", got ", t.sizes());
}

// column, column_off_local [B, h, Lk], group_mass [B, h, nB], by_group [B, h, Lk, G] (fp32); per head (int64 [h]):
// sink, local, vertical, min_vertical, slash and min_slash (in groups), target (fp32 [h], gamma x n).  Returns
// block_count, block_offset, column_count, column_index (int32, as `VerticalSlash.build` on the torch path).
std::vector<at::Tensor> vertical_slash_layout(const at::Tensor& column, const at::Tensor& column_off_local,
                                              const at::Tensor& group_mass, const at::Tensor& by_group,
                                              const at::Tensor& budgets, const at::Tensor& target, int64_t pos0,
                                              bool gamma_mode, bool causal, int64_t q_len, int64_t block_m,
                                              int64_t block_n, int64_t width_v, int64_t width_s,
                                              int64_t tiles_per_group) {
  TORCH_CHECK(column.dim() == 3 && by_group.dim() == 4, "vertical_slash_layout_cpu: column [B, h, Lk], by_group [B, h, Lk, G]");
  Params p{};
  p.B = column.size(0), p.h = column.size(1), p.Lk = column.size(2), p.Lq = q_len, p.nB = group_mass.size(2);
  p.G = by_group.size(3), p.pos0 = pos0, p.block_m = block_m, p.block_n = block_n, p.width_v = width_v;
  p.width_s = width_s, p.gamma_mode = gamma_mode, p.causal = causal;
  check_float(column, "column", {p.B, p.h, p.Lk});
  check_float(column_off_local, "column_off_local", {p.B, p.h, p.Lk});
  check_float(group_mass, "group_mass", {p.B, p.h, (p.Lk + block_n - 1) / block_n});
  check_float(by_group, "by_group", {p.B, p.h, p.Lk, p.G});
  check_float(target, "target", {p.h});
  TORCH_CHECK(budgets.scalar_type() == at::kLong && budgets.is_contiguous() && budgets.sizes() == at::IntArrayRef({6, p.h}),
              "vertical_slash_layout_cpu: budgets must be contiguous int64 [6, h]");
  TORCH_CHECK(block_m >= 1 && block_n >= 1 && q_len >= 1 && q_len <= p.Lk && width_v >= 1 && width_s >= 1,
              "vertical_slash_layout_cpu: bad sizes");
  const int64_t* bud = budgets.data_ptr<int64_t>();
  const float* tgt = target.data_ptr<float>();
  const int64_t Lk = p.Lk, nB = p.nB, H = p.h;
  std::vector<HeadChoice> choice(p.B * H);
  at::parallel_for(0, p.B * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t hd = i % H;
      choice[i] = choose_head(column.data_ptr<float>() + i * Lk, column_off_local.data_ptr<float>() + i * Lk,
                              group_mass.data_ptr<float>() + i * nB, by_group.data_ptr<float>() + i * Lk * p.G,
                              bud[0 * H + hd], bud[1 * H + hd], bud[2 * H + hd], bud[3 * H + hd], bud[4 * H + hd],
                              bud[5 * H + hd], tgt[hd], p);
    }
  });
  // Slots: as many as the fullest head keeps (the torch path's compaction).
  int64_t n_v = 1, n_s = 1;
  for (const auto& c : choice) {
    n_v = std::max<int64_t>(n_v, c.columns.size());
    n_s = std::max<int64_t>(n_s, c.groups.size());
  }
  const int64_t max_tiles = std::min(n_s * tiles_per_group, (Lk + block_n - 1) / block_n);
  const int64_t n_qb = (q_len + block_m - 1) / block_m;
  auto opt = column.options().dtype(at::kInt);
  auto count = at::empty({p.B, H, n_qb}, opt), offsets = at::empty({p.B, H, n_qb, max_tiles}, opt);
  auto col_count = at::empty({p.B, H, n_qb}, opt), col_index = at::empty({p.B, H, n_qb, n_v}, opt);
  at::parallel_for(0, p.B * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      write_head(choice[i], p, max_tiles, count.data_ptr<int32_t>() + i * n_qb,
                 offsets.data_ptr<int32_t>() + i * n_qb * max_tiles, col_count.data_ptr<int32_t>() + i * n_qb,
                 col_index.data_ptr<int32_t>() + i * n_qb * n_v, n_v);
  });
  return {count, offsets, col_count, col_index};
}

// `SparseLayout.key_counts`: keys each query block computes (tile keys below the block's key limit, plus columns
// below it), int64 [B, H, nQb]; `limit` int64 [nQb] (one past the last key a block may see).  Any layout.
at::Tensor key_counts(const at::Tensor& offsets, const at::Tensor& count, const at::Tensor& columns,
                      const at::Tensor& col_count, const at::Tensor& limit, int64_t block_n) {
  for (const at::Tensor* t : {&offsets, &count, &columns, &col_count})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && !t->is_cuda(),
                "key_counts_cpu: layout tensors must be contiguous int32 CPU tensors");
  TORCH_CHECK(count.dim() == 3 && offsets.dim() == 4 && columns.dim() == 4 && col_count.sizes() == count.sizes() &&
              offsets.sizes().slice(0, 3) == count.sizes() && columns.sizes().slice(0, 3) == count.sizes(),
              "key_counts_cpu: block_count [B, H, nQb], block_offset [B, H, nQb, T], column_index [B, H, nQb, C]");
  TORCH_CHECK(limit.scalar_type() == at::kLong && limit.is_contiguous() && limit.dim() == 1 &&
              limit.size(0) == count.size(2), "key_counts_cpu: limit must be contiguous int64 [nQb]");
  const int64_t rows = count.numel(), n_qb = count.size(2), T = offsets.size(3), C = columns.size(3);
  auto out = at::empty(count.sizes(), count.options().dtype(at::kLong));
  const int32_t *off = offsets.data_ptr<int32_t>(), *cnt = count.data_ptr<int32_t>();
  const int32_t *col = columns.data_ptr<int32_t>(), *ccnt = col_count.data_ptr<int32_t>();
  const int64_t* lim = limit.data_ptr<int64_t>();
  int64_t* res = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t L = lim[i % n_qb];
      int64_t keys = 0;
      for (int64_t t = 0; t < std::min<int64_t>(cnt[i], T); ++t) {
        const int64_t o = off[i * T + t];
        keys += std::max<int64_t>(std::min<int64_t>(o + block_n, L) - o, 0);
      }
      for (int64_t c = 0; c < std::min<int64_t>(ccnt[i], C); ++c) keys += col[i * C + c] < L;
      res[i] = keys;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(sparse_attn_cpu_vs_layout, m) {
  m.def("vertical_slash_layout(Tensor column, Tensor column_off_local, Tensor group_mass, Tensor by_group, "
        "Tensor budgets, Tensor target, int pos0, bool gamma_mode, bool causal, int q_len, int block_m, int block_n, "
        "int width_v, int width_s, int tiles_per_group) -> Tensor[]");
  m.impl("vertical_slash_layout", c10::DispatchKey::CPU, &vertical_slash_layout);
  m.def("key_counts(Tensor offsets, Tensor count, Tensor columns, Tensor col_count, Tensor limit, int block_n) "
        "-> Tensor");
  m.impl("key_counts", c10::DispatchKey::CPU, &key_counts);
}
