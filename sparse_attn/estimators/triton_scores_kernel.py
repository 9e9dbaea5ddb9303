"""Triton kernels: the vertical-slash estimator's sample scores (launcher: `triton_scores_launch`).

The sample is the last ``n`` query rows of each (batch, selected query head); sample row ``r`` is query row
``q_len - n + r`` and sits at key position ``pos = k_len - n + r`` (bottom-right alignment).  With ``CAUSAL`` it
sees keys up to ``pos``.  KV head = query head // ``kv_group`` (GQA by index, KV never repeated).  The softmax is
taken in two passes so the ``[n, k_len]`` probabilities never reach global memory:

1. `sample_row_stats_kernel`: per (key chunk, row block, head) the running max and sum of ``exp2`` (log2 units);
   the launcher folds the chunks into one log2-sum-exp per row (a few hundred floats per head).
2. `sample_mass_kernel`: one program per (key tile, head) recomputes its tile of logits for every sample row,
   normalises with the row's log2-sum-exp and reduces over the rows, so each key's column mass is written once
   (no atomics).  ``MODE == 0`` also writes the column mass outside the ``local`` nearest diagonals and the
   diagonal mass (per distance ``d = pos - key >= 0``) outside the first ``sink`` columns, added with fp32 atomics:
   with ``USE_GATHER`` the tile is first skewed so that each distance is one lane (``tl.gather``, Triton >= 3.3),
   which leaves ``BLOCK_M + BLOCK_N - 1`` atomics per tile (at most two per distance when the sample fits one row
   block, so the result is deterministic); without it every element is added on its own.  ``MODE == 1`` writes
   the column mass lying on chosen diagonal groups (``Picked``, one flag per group of ``group`` distances).

Plain pointer arithmetic with int64 offsets (no block pointers).  Readable reference: `estimators.sample_mass`
(`last_query_probs`, `column_mass`, `diagonal_mass`).
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_sel", "kv_group", "q_len", "k_len", "n", "chunk", "n_chunks"])
def sample_row_stats_kernel(
        Q, K, Heads, RowMax, RowSum,
        stride_q_b, stride_q_h, stride_q_l, stride_q_d, stride_k_b, stride_k_h, stride_k_l, stride_k_d,
        n_sel, kv_group, q_len, k_len, n, chunk, n_chunks, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Row max and sum of exp2 of the sample's logits (log2 units) over keys ``[c * chunk, (c + 1) * chunk)``:
    ``RowMax, RowSum [B * n_sel, n_chunks, n]`` (max -inf and sum 0 where a row sees no key there)."""
    c, rb, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, i = pid_bh // n_sel, pid_bh % n_sel
    h = tl.load(Heads + i)
    d = tl.arange(0, BLOCK_D)
    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)                    # sample rows (helpers inlined: the interpreter
    r_ok = r < n                                                # pays a lot per nested jit call)
    pos = k_len - n + r
    q = tl.load(Q + b.to(tl.int64) * stride_q_b + h.to(tl.int64) * stride_q_h
                + (q_len - n + r).to(tl.int64)[:, None] * stride_q_l + d[None, :] * stride_q_d,
                mask=r_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b.to(tl.int64) * stride_k_b + (h // kv_group).to(tl.int64) * stride_k_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    hi = tl.minimum(c * chunk + chunk, k_len)
    if CAUSAL:
        hi = tl.minimum(hi, tl.minimum(rb * BLOCK_M + BLOCK_M, n) + k_len - n)     # past the block's last row
    lane = tl.arange(0, BLOCK_N)
    for start in range(c * chunk, hi, BLOCK_N):
        keys = start + lane
        key_ok = keys < hi
        k_t = tl.load(k_base + keys.to(tl.int64)[None, :] * stride_k_l + d[:, None] * stride_k_d,
                      mask=key_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)                   # [D, N]
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                          # nothing seen yet: no NaN
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
        m_i = m_new
    out = (pid_bh.to(tl.int64) * n_chunks + c) * n + r
    tl.store(RowMax + out, m_i, mask=r_ok)
    tl.store(RowSum + out, l_i, mask=r_ok)


@triton.jit(do_not_specialize=["n_sel", "kv_group", "q_len", "k_len", "n", "group", "n_groups"])
def sample_mass_kernel(
        Q, K, Heads, RowLse, Sink, Local, Picked, Column, ColumnOffLocal, Diagonal,
        stride_q_b, stride_q_h, stride_q_l, stride_q_d, stride_k_b, stride_k_h, stride_k_l, stride_k_d,
        n_sel, kv_group, q_len, k_len, n, group, n_groups, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, MODE: tl.constexpr, USE_GATHER: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Masses of the keys of tile ``program_id(0)`` for head ``program_id(1)`` (outputs [B * n_sel, k_len] fp32,
    ``Diagonal`` zero-filled by the caller; ``RowLse [B * n_sel, n]`` log2-sum-exp per sample row)."""
    kt, pid_bh = tl.program_id(0), tl.program_id(1)
    b, i = pid_bh // n_sel, pid_bh % n_sel
    h = tl.load(Heads + i)
    lane = tl.arange(0, BLOCK_N)
    keys = kt * BLOCK_N + lane
    key_ok = keys < k_len
    d = tl.arange(0, BLOCK_D)
    k_t = tl.load(K + b.to(tl.int64) * stride_k_b + (h // kv_group).to(tl.int64) * stride_k_h
                  + keys.to(tl.int64)[None, :] * stride_k_l + d[:, None] * stride_k_d,
                  mask=key_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)                        # [D, N]
    q_base = Q + b.to(tl.int64) * stride_q_b + h.to(tl.int64) * stride_q_h
    row64 = pid_bh.to(tl.int64)
    if MODE == 0:
        sink, local = tl.load(Sink + i), tl.load(Local + i)
    col = tl.zeros([BLOCK_N], tl.float32)
    col_off = tl.zeros([BLOCK_N], tl.float32)
    for rb in range(0, tl.cdiv(n, BLOCK_M)):
        r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = r < n
        pos = k_len - n + r
        q = tl.load(q_base + (q_len - n + r).to(tl.int64)[:, None] * stride_q_l + d[None, :] * stride_q_d,
                    mask=r_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        lse = tl.load(RowLse + row64 * n + r, mask=r_ok, other=0.0)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        visible = r_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= pos[:, None])
        p = tl.where(visible, tl.exp2(qk - lse[:, None]), 0.0)                          # [M, N] probabilities
        dist = pos[:, None] - keys[None, :]
        if MODE == 0:
            col += tl.sum(p, 0)
            col_off += tl.sum(tl.where((dist >= 0) & (dist < local), 0.0, p), 0)
            p_diag = tl.where((dist >= 0) & (keys[None, :] >= sink), p, 0.0)
            if USE_GATHER:
                # Skew: lane w of row j holds the key at distance d0 + w, d0 = first row's pos - last key.
                w = tl.arange(0, 2 * BLOCK_N)                 # BLOCK_M <= BLOCK_N: covers BLOCK_M + BLOCK_N - 1
                src = (tl.arange(0, BLOCK_M) + BLOCK_N - 1)[:, None] - w[None, :]
                src_ok = (src >= 0) & (src < BLOCK_N)
                skew = tl.gather(p_diag, tl.where(src_ok, src, 0), 1)
                per_dist = tl.sum(tl.where(src_ok, skew, 0.0), 0)                       # [2 N]
                d_w = rb * BLOCK_M + k_len - n - (kt * BLOCK_N + BLOCK_N - 1) + w
                tl.atomic_add(Diagonal + row64 * k_len + d_w, per_dist,
                              mask=(d_w >= 0) & (d_w < k_len) & (w < BLOCK_M + BLOCK_N - 1))
            else:
                tl.atomic_add(Diagonal + row64 * k_len + dist, p_diag, mask=visible & (dist >= 0))
        else:
            on = tl.load(Picked + row64 * (n_groups + 1) + tl.where(dist >= 0, dist // group, n_groups),
                         mask=visible, other=0)
            col += tl.sum(tl.where(on != 0, p, 0.0), 0)
    tl.store(Column + row64 * k_len + keys, col, mask=key_ok)
    if MODE == 0:
        tl.store(ColumnOffLocal + row64 * k_len + keys, col_off, mask=key_ok)
