"""Triton kernel: flash attention over the tiles and columns of a SparseLayout (launcher: `launcher.py`).

One program per (query block, batch x query head): ``BLOCK_M`` query rows of one layout block (``TILE_M`` rows;
a block wider than ``BLOCK_M`` is split over several programs).  It walks the block's key tiles (``TILE_N`` keys
each, at any offset, in ``BLOCK_N`` steps), then its single columns in gathered chunks of ``BLOCK_N``, with an
online softmax in exp2 form (``qk_scale = scale * log2(e)``) and fp32 accumulation.  Query row ``i`` sits at key
position ``i + k_len - q_len`` (bottom-right); with ``CAUSAL`` it sees keys up to there.  Keys outside
``[0, k_len)`` are masked, so junk in an index can never be read.  KV head = query head // ``kv_group`` (GQA by
index, no repeated KV).  With ``SOFTCAP`` the scaled scores are capped to ``softcap * tanh(s / softcap)`` before
the mask (Gemma-2; in log2 units the cap is ``softcap * log2(e)``).  Plain pointer arithmetic with int64 offsets (no
block pointers: gone in Triton 3.9).

Readable reference: `backends.reference.reference_attention` with ``mask=layout.to_mask()``.
"""
import triton
import triton.language as tl


@triton.jit
def _soft_cap(x, cap):
    """``cap * tanh(x / cap)``, tanh from exp2 (no tanh in the interpreter): 1 - 2 / (e^2y + 1) saturates to +-1
    without overflow."""
    e2y = tl.exp2(x * (2.0 * 1.4426950408889634 / cap))
    return cap * (1.0 - 2.0 / (e2y + 1.0))


@triton.jit
def _attend_keys(acc, m_i, l_i, q, k_base, v_base, keys, key_ok, pos, d, qk_scale, softcap_log2,
                 stride_k_l, stride_k_d, stride_v_l, stride_v_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the keys ``keys [N]`` (valid where ``key_ok``) into the running (acc [M, D], max m_i, sum l_i)."""
    keys64 = keys.to(tl.int64)
    k_mask = key_ok[None, :]
    v_mask = key_ok[:, None]
    if HEAD_DIM != BLOCK_D:          # padded head dim only: a mask along D would stop vectorised loads
        k_mask = k_mask & (d[:, None] < HEAD_DIM)
        v_mask = v_mask & (d[None, :] < HEAD_DIM)
    k_t = tl.load(k_base + keys64[None, :] * stride_k_l + d[:, None] * stride_k_d, mask=k_mask, other=0.0)  # [D, N]
    qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale                  # [M, N], log2 units
    if SOFTCAP:
        qk = _soft_cap(qk, softcap_log2)
    visible = key_ok[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= pos[:, None])
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # a row with nothing visible yet: no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + keys64[:, None] * stride_v_l + d[None, :] * stride_v_d, mask=v_mask, other=0.0)  # [N, D]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Sizes are not specialised: a length of 1 would otherwise become a compile-time constant (and a new compile).
@triton.jit(do_not_specialize=["n_heads", "kv_group", "q_len", "k_len", "n_qb", "max_blocks", "max_columns"])
def sparse_attention_kernel(
        Q, K, V, Out, Lse, BlockCount, BlockOffset, ColumnCount, ColumnIndex,
        stride_q_b, stride_q_h, stride_q_l, stride_q_d,
        stride_k_b, stride_k_h, stride_k_l, stride_k_d,
        stride_v_b, stride_v_h, stride_v_l, stride_v_d,
        stride_o_b, stride_o_h, stride_o_l, stride_o_d,
        n_heads, kv_group, q_len, k_len, n_qb, max_blocks, max_columns, qk_scale, softcap_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr = False):
    SPLIT_M: tl.constexpr = (TILE_M + BLOCK_M - 1) // BLOCK_M
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    qb = n_qb - 1 - pid_m // SPLIT_M                        # last (longest causal) blocks launch first
    sub = pid_m % SPLIT_M
    b, h = pid_bh // n_heads, pid_bh % n_heads
    kvh = h // kv_group

    local = sub * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qb * TILE_M + local
    row_ok = (local < TILE_M) & (rows < q_len)
    pos = rows + (k_len - q_len)
    # One past the last key any row here may see: bounds every tile and column.
    last_row = tl.minimum(tl.minimum(qb * TILE_M + sub * BLOCK_M + BLOCK_M, qb * TILE_M + TILE_M), q_len) - 1
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(last_row + (k_len - q_len) + 1, k_len)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    rows64 = rows.to(tl.int64)
    q_base = Q + b.to(tl.int64) * stride_q_b + h.to(tl.int64) * stride_q_h
    q = tl.load(q_base + rows64[:, None] * stride_q_l + d[None, :] * stride_q_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_k_b + kvh.to(tl.int64) * stride_k_h
    v_base = V + b.to(tl.int64) * stride_v_b + kvh.to(tl.int64) * stride_v_h

    index_row = pid_bh.to(tl.int64) * n_qb + qb
    n_tiles = tl.minimum(tl.load(BlockCount + index_row), max_blocks)       # a bad count cannot read past the row
    n_cols = tl.minimum(tl.load(ColumnCount + index_row), max_columns)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lane = tl.arange(0, BLOCK_N)
    for t in range(0, n_tiles):
        start = tl.load(BlockOffset + index_row * max_blocks + t)
        for s in tl.static_range(0, TILE_N, BLOCK_N):                        # a tile wider than BLOCK_N
            keys = start + s + lane
            key_ok = (s + lane < TILE_N) & (keys >= 0) & (keys < hi)
            acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_base, v_base, keys, key_ok, pos, d, qk_scale,
                                         softcap_log2, stride_k_l, stride_k_d, stride_v_l, stride_v_d, HEAD_DIM,
                                         BLOCK_D, CAUSAL, SOFTCAP, DOT_PRECISION)
    for c in range(0, n_cols, BLOCK_N):
        listed = c + lane < n_cols
        keys = tl.load(ColumnIndex + index_row * max_columns + c + lane, mask=listed, other=-1)
        key_ok = listed & (keys >= 0) & (keys < hi)
        acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_base, v_base, keys, key_ok, pos, d, qk_scale,
                                     softcap_log2, stride_k_l, stride_k_d, stride_v_l, stride_v_d, HEAD_DIM, BLOCK_D,
                                     CAUSAL, SOFTCAP, DOT_PRECISION)

    # A row that saw no key: output 0, LSE -inf (the torch backend's convention).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = Out + b.to(tl.int64) * stride_o_b + h.to(tl.int64) * stride_o_h
    tl.store(o_base + rows64[:, None] * stride_o_l + d[None, :] * stride_o_d, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # log2 -> ln
        tl.store(Lse + pid_bh.to(tl.int64) * q_len + rows64, lse, mask=row_ok)
