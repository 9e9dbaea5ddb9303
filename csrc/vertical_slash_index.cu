// Vertical / slash indexes -> SparseLayout index tensors (block_count, block_offset, column_count, column_index).
//
// GPU fast path of sparse_attn.integrations.engines.convert_vertical_slash_indexes; the semantics are that
// function's (read its docstring).  One thread per (batch, head, query block); the launcher
// (sparse_attn/ops/cuda.py) sorts the verticals ascending and the slashes descending (so the slash ranges of a
// query block come in ascending start order), widens both to int64 and zero-fills the outputs.
//
// Per query block, rows at key positions p0..p1 (bottom-right alignment), keys < limit are allowed
// (limit = p1 + 1 with causal, kv_len without):
//   * slash s gives the key range [max(p0 - s, 0), min(p1 - s + 1, limit)); ranges closer than block_n merge
//     into one group and a group [a, e) is covered by tiles at a, a + block_n, ... (< e);
//   * each distinct vertical v in [0, limit) that no tile covers becomes a column.
// No headers: NVRTC compiles this as is.

extern "C" __global__ void vertical_slash_to_layout(
    const int* __restrict__ q_seqlens,            // [batch]
    const int* __restrict__ kv_seqlens,           // [batch]
    const long long* __restrict__ vertical,       // [batch, heads, nnz_v], ascending per (batch, head)
    const long long* __restrict__ slash,          // [batch, heads, nnz_s], descending per (batch, head)
    int* __restrict__ block_count,                // [batch, heads, n_rows]
    int* __restrict__ block_offset,               // [batch, heads, n_rows, max_tiles]
    int* __restrict__ column_count,               // [batch, heads, n_rows]
    int* __restrict__ column_index,               // [batch, heads, n_rows, nnz_v]
    int heads, int n_rows, int nnz_v, int nnz_s, int max_tiles, int block_m, int block_n, int causal)
{
    const int m = blockIdx.x * blockDim.x + threadIdx.x;   // query block
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const long long q_len = q_seqlens[b];
    const long long kv_len = kv_seqlens[b];
    const long long n_qb = (q_len + block_m - 1) / block_m;
    if (m >= n_rows || m >= n_qb) return;                  // rows past the entry's queries stay empty (zeros)

    const long long shift = kv_len - q_len;
    const long long p0 = (long long)m * block_m + shift;
    const long long last_row = ((long long)(m + 1) * block_m < q_len ? (long long)(m + 1) * block_m : q_len) - 1;
    const long long p1 = last_row + shift;
    const long long limit = causal ? p1 + 1 : kv_len;
    const long long key_end = limit < kv_len ? limit : kv_len;

    const long long bh = (long long)b * heads + h;
    const long long row = bh * n_rows + m;
    int* offsets = block_offset + row * max_tiles;
    const long long* slashes = slash + bh * nnz_s;
    const long long* verticals = vertical + bh * nnz_v;

    // ---- slash ranges -> merged groups -> tiles
    long long count = 0;
    bool open = false;
    long long g_start = 0, g_end = 0;
    for (int i = 0; i < nnz_s; ++i) {
        const long long s = slashes[i];
        const long long start = p0 - s > 0 ? p0 - s : 0;
        const long long end = p1 - s + 1 < key_end ? p1 - s + 1 : key_end;
        if (end <= start) continue;                         // the diagonal misses this block's allowed keys
        if (open && start < g_end + block_n) {              // close enough: extend the current group
            g_end = end > g_end ? end : g_end;
            continue;
        }
        if (open) {
            for (long long o = g_start; o < g_end; o += block_n, ++count)
                if (count < max_tiles) offsets[count] = (int)o;
        }
        open = true;
        g_start = start;
        g_end = end;
    }
    if (open) {
        for (long long o = g_start; o < g_end; o += block_n, ++count)
            if (count < max_tiles) offsets[count] = (int)o;
    }
    const int n_tiles = (int)(count < max_tiles ? count : max_tiles);
    block_count[row] = n_tiles;

    // ---- verticals outside every tile -> columns (both lists ascending: one merge walk)
    int* columns = column_index + row * nnz_v;
    int n_cols = 0, t = 0;
    for (int i = 0; i < nnz_v; ++i) {
        const long long v = verticals[i];
        if (i > 0 && v == verticals[i - 1]) continue;      // duplicates count once
        if (v < 0) continue;
        if (v >= limit) break;                              // ascending: the rest are past the limit too
        while (t < n_tiles && (long long)offsets[t] + block_n <= v) ++t;
        if (t < n_tiles && (long long)offsets[t] <= v) continue;   // inside a tile
        columns[n_cols++] = (int)v;
    }
    column_count[row] = n_cols;
}
