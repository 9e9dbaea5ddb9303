// Sparse attention over a SparseLayout: the straightforward CUDA-core kernel of backend="cuda".
//
// One thread block per (query block m, query head h, batch b).  It runs the block's rows in passes of ROWS and, per
// pass, walks the layout's key tiles (block_n keys at any offset) then its single columns, KEYS keys at a time:
// K and V of those keys go to shared memory (fp32), scores and an online softmax (exp2 form, fp32) update the
// per-row output accumulators in registers.  Bottom-right causal alignment: query row i sits at key position
// i + k_len - q_len.  GQA by index: query head h reads KV head h / group.  A row that sees no key gets output 0
// and LSE -inf (the torch backend's convention).
//
// Thread mapping: 256 threads = 16 row groups x 16 lanes.  Group g owns rows 4g..4g+3 of the pass; lane j holds
// the scores of keys j and j + 16 of the KEYS-key chunk and the output columns j, j + 16, ... of its 4 rows.
// Row statistics are reduced over the 16 lanes with width-16 shuffles.
//
// Compile-time specialisation (the loader passes -D...): SA_DTYPE 0 = fp16, 1 = bf16, 2 = fp32 (16-bit types
// arrive as raw unsigned short bits and are converted here, so no headers are needed under NVRTC);
// SA_HEAD_DIM in {64, 80, 96, 128, 256}.

#ifndef SA_DTYPE
#define SA_DTYPE 0
#endif
#ifndef SA_HEAD_DIM
#define SA_HEAD_DIM 128
#endif
#if SA_HEAD_DIM % 16 != 0
#error "SA_HEAD_DIM must be a multiple of 16"
#endif

#define ROWS 64                          // query rows per pass
#define KEYS 32                          // keys per chunk
#define THREADS 256
#define LANES 16                         // lanes sharing one row group
#define ROWS_PER_GROUP 4
#define KEYS_PER_LANE (KEYS / LANES)
#define COLS_PER_LANE (SA_HEAD_DIM / LANES)
#define QK_STRIDE (SA_HEAD_DIM + 1)      // odd row stride: conflict-free column reads of Q and K
#define NEG_INF (-__int_as_float(0x7f800000))
#define LN2 0.6931471805599453f

#if SA_DTYPE == 2
typedef float elem_t;
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float from_float(float x) { return x; }
#elif SA_DTYPE == 0
typedef unsigned short elem_t;
__device__ __forceinline__ float to_float(unsigned short x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
__device__ __forceinline__ unsigned short from_float(float f) {
    unsigned short x;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
}
#elif SA_DTYPE == 1
typedef unsigned short elem_t;
__device__ __forceinline__ float to_float(unsigned short x) { return __uint_as_float(((unsigned int)x) << 16); }
__device__ __forceinline__ unsigned short from_float(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);   // NaN stays a NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                                   // round to nearest even
    return (unsigned short)(u >> 16);
}
#else
#error "SA_DTYPE must be 0 (fp16), 1 (bf16) or 2 (fp32)"
#endif

__device__ __forceinline__ float group_max(float x) {
    for (int o = LANES / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o, LANES));
    return x;
}

__device__ __forceinline__ float group_sum(float x) {
    for (int o = LANES / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o, LANES);
    return x;
}

// Attend the rows of this pass to the keys in key_pos[0..KEYS) (-1: no key): load K/V, score, online softmax.
__device__ __forceinline__ void attend_chunk(
    const elem_t* __restrict__ k_head, const elem_t* __restrict__ v_head, long long skl, long long skd,
    long long svl, long long svd, const float* __restrict__ sq, float* __restrict__ sk, float* __restrict__ sv,
    const int* __restrict__ key_pos, long long first_row_pos, int rows_in_pass, int causal, float softcap_log2,
    float (&row_max)[ROWS_PER_GROUP], float (&row_sum)[ROWS_PER_GROUP],
    float (&acc)[ROWS_PER_GROUP][COLS_PER_LANE])
{
    const int tid = threadIdx.x, group = tid / LANES, lane = tid % LANES;
    for (int e = tid; e < KEYS * SA_HEAD_DIM; e += THREADS) {
        const int i = e / SA_HEAD_DIM, d = e % SA_HEAD_DIM;
        const long long p = key_pos[i];
        sk[i * QK_STRIDE + d] = p >= 0 ? to_float(k_head[p * skl + d * skd]) : 0.0f;
        sv[i * SA_HEAD_DIM + d] = p >= 0 ? to_float(v_head[p * svl + d * svd]) : 0.0f;
    }
    __syncthreads();

    float s[ROWS_PER_GROUP][KEYS_PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS_PER_GROUP; ++r)
#pragma unroll
        for (int c = 0; c < KEYS_PER_LANE; ++c) s[r][c] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < SA_HEAD_DIM; ++d) {
        float kv[KEYS_PER_LANE];
#pragma unroll
        for (int c = 0; c < KEYS_PER_LANE; ++c) kv[c] = sk[(lane + c * LANES) * QK_STRIDE + d];
#pragma unroll
        for (int r = 0; r < ROWS_PER_GROUP; ++r) {
            const float qv = sq[(group * ROWS_PER_GROUP + r) * QK_STRIDE + d];
#pragma unroll
            for (int c = 0; c < KEYS_PER_LANE; ++c) s[r][c] += qv * kv[c];
        }
    }

    float p[ROWS_PER_GROUP][KEYS_PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS_PER_GROUP; ++r) {
        const int row = group * ROWS_PER_GROUP + r;
        const long long pos = first_row_pos + row;
        float chunk_max = NEG_INF;
#pragma unroll
        for (int c = 0; c < KEYS_PER_LANE; ++c) {
            const long long key = key_pos[lane + c * LANES];
            const bool visible = row < rows_in_pass && key >= 0 && (!causal || key <= pos);
            // soft-capping (Gemma-2) in log2 units: cap * tanh(s / cap) with cap = softcap * log2(e); 0 = off
            const float capped = softcap_log2 > 0.0f ? softcap_log2 * tanhf(s[r][c] / softcap_log2) : s[r][c];
            s[r][c] = visible ? capped : NEG_INF;
            chunk_max = fmaxf(chunk_max, s[r][c]);
        }
        const float new_max = fmaxf(row_max[r], group_max(chunk_max));
        // Nothing visible yet: keep everything at zero (exp2(-inf - -inf) would be NaN).
        const float alpha = new_max == NEG_INF ? 1.0f : exp2f(row_max[r] - new_max);
        float chunk_sum = 0.0f;
#pragma unroll
        for (int c = 0; c < KEYS_PER_LANE; ++c) {
            p[r][c] = new_max == NEG_INF ? 0.0f : exp2f(s[r][c] - new_max);
            chunk_sum += p[r][c];
        }
        row_sum[r] = row_sum[r] * alpha + group_sum(chunk_sum);
        row_max[r] = new_max;
#pragma unroll
        for (int t = 0; t < COLS_PER_LANE; ++t) acc[r][t] *= alpha;
    }

#pragma unroll
    for (int n = 0; n < KEYS; ++n) {
        float pn[ROWS_PER_GROUP];
#pragma unroll
        for (int r = 0; r < ROWS_PER_GROUP; ++r) pn[r] = __shfl_sync(0xffffffffu, p[r][n / LANES], n % LANES, LANES);
#pragma unroll
        for (int t = 0; t < COLS_PER_LANE; ++t) {
            const float vv = sv[n * SA_HEAD_DIM + lane + t * LANES];
#pragma unroll
            for (int r = 0; r < ROWS_PER_GROUP; ++r) acc[r][t] += pn[r] * vv;
        }
    }
    __syncthreads();                      // sk, sv and key_pos are rewritten by the next chunk
}

extern "C" __global__ void __launch_bounds__(THREADS) sparse_attention_fwd(
    const elem_t* __restrict__ q,         // [B, Hq, Lq, D], strides sq*
    const elem_t* __restrict__ k,         // [B, Hkv, Lk, D], strides sk*
    const elem_t* __restrict__ v,         // [B, Hkv, Lk, D], strides sv*
    elem_t* __restrict__ out,             // [B, Hq, Lq, D], contiguous
    float* __restrict__ lse,              // [B, Hq, Lq], contiguous (natural log); unused unless write_lse
    const int* __restrict__ block_count,  // [B, Hq, nQb], contiguous
    const int* __restrict__ block_offset, // [B, Hq, nQb, max_blocks], contiguous
    const int* __restrict__ column_count, // [B, Hq, nQb], contiguous
    const int* __restrict__ column_index, // [B, Hq, nQb, max_columns], contiguous
    long long sqb, long long sqh, long long sql, long long sqd,
    long long skb, long long skh, long long skl, long long skd,
    long long svb, long long svh, long long svl, long long svd,
    int q_heads, int group_size, int q_len, int k_len, int n_qb, int max_blocks, int max_columns,
    int block_m, int block_n, float scale_log2, float softcap_log2, int causal, int write_lse)
{
    extern __shared__ float smem[];
    float* sq = smem;                                  // [ROWS][QK_STRIDE], pre-scaled by scale * log2(e)
    float* sk = sq + ROWS * QK_STRIDE;                 // [KEYS][QK_STRIDE]
    float* sv = sk + KEYS * QK_STRIDE;                 // [KEYS][SA_HEAD_DIM]
    int* key_pos = (int*)(sv + KEYS * SA_HEAD_DIM);    // [KEYS]

    const int m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, group = tid / LANES, lane = tid % LANES;
    const long long index_row = ((long long)b * q_heads + h) * n_qb + m;
    const int n_tiles = block_count[index_row];
    const int n_cols = column_count[index_row];
    const int* tiles = block_offset + index_row * max_blocks;
    const int* cols = column_index + index_row * max_columns;
    const elem_t* q_head = q + b * sqb + h * sqh;
    const elem_t* k_head = k + b * skb + (long long)(h / group_size) * skh;
    const elem_t* v_head = v + b * svb + (long long)(h / group_size) * svh;
    const long long shift = (long long)k_len - q_len;
    const int block_end = min((m + 1) * block_m, q_len);

    for (int row0 = m * block_m; row0 < block_end; row0 += ROWS) {
        const int rows_in_pass = min(ROWS, block_end - row0);
        const long long first_row_pos = row0 + shift;
        // Keys past the last row's position are invisible to the whole pass when causal.
        const long long key_end = causal ? min((long long)k_len, first_row_pos + rows_in_pass) : (long long)k_len;

        for (int e = tid; e < ROWS * SA_HEAD_DIM; e += THREADS) {
            const int r = e / SA_HEAD_DIM, d = e % SA_HEAD_DIM;
            sq[r * QK_STRIDE + d] = r < rows_in_pass ? to_float(q_head[(row0 + r) * sql + d * sqd]) * scale_log2 : 0.0f;
        }
        float row_max[ROWS_PER_GROUP], row_sum[ROWS_PER_GROUP], acc[ROWS_PER_GROUP][COLS_PER_LANE];
#pragma unroll
        for (int r = 0; r < ROWS_PER_GROUP; ++r) {
            row_max[r] = NEG_INF;
            row_sum[r] = 0.0f;
#pragma unroll
            for (int t = 0; t < COLS_PER_LANE; ++t) acc[r][t] = 0.0f;
        }

        for (int i = 0; i < n_tiles; ++i) {           // dense tiles [offset, offset + block_n) at any offset
            const long long first = max((long long)tiles[i], 0LL);
            const long long last = min((long long)tiles[i] + block_n, key_end);
            for (long long n0 = first; n0 < last; n0 += KEYS) {
                if (tid < KEYS) key_pos[tid] = n0 + tid < last ? (int)(n0 + tid) : -1;
                __syncthreads();
                attend_chunk(k_head, v_head, skl, skd, svl, svd, sq, sk, sv, key_pos, first_row_pos, rows_in_pass,
                             causal, softcap_log2, row_max, row_sum, acc);
            }
        }
        for (int c0 = 0; c0 < n_cols; c0 += KEYS) {    // single columns, KEYS at a time
            if (tid < KEYS) {
                const int c = c0 + tid < n_cols ? cols[c0 + tid] : -1;
                key_pos[tid] = c >= 0 && c < key_end ? c : -1;
            }
            __syncthreads();
            attend_chunk(k_head, v_head, skl, skd, svl, svd, sq, sk, sv, key_pos, first_row_pos, rows_in_pass,
                         causal, softcap_log2, row_max, row_sum, acc);
        }

#pragma unroll
        for (int r = 0; r < ROWS_PER_GROUP; ++r) {
            const int row = group * ROWS_PER_GROUP + r;
            if (row >= rows_in_pass) continue;
            const long long out_row = (((long long)b * q_heads + h) * q_len + row0 + row);
            const float inv = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
#pragma unroll
            for (int t = 0; t < COLS_PER_LANE; ++t)
                out[out_row * SA_HEAD_DIM + lane + t * LANES] = from_float(acc[r][t] * inv);
            if (write_lse && lane == 0)
                lse[out_row] = row_sum[r] > 0.0f ? (row_max[r] + log2f(row_sum[r])) * LN2 : NEG_INF;
        }
        __syncthreads();                              // sq is rewritten by the next pass
    }
}
