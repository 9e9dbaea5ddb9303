"""The algorithms of the CUDA kernels, transcribed step by step into Python, checked on the CPU against the torch
implementations and the dense oracle.  A GPU run (tests/test_cuda_gpu.py) checks the compiled kernels themselves;
these mirrors check the logic (tile/column walks, passes, chunking, masking, online softmax) where no GPU is.
Keep them in step with csrc/: each block below names the kernel lines it mirrors."""
import math
import random

import pytest
import torch

import sparse_attn as sa
from sparse_attn.integrations import convert_vertical_slash_indexes
from sparse_attn.ops import cuda
from sparse_attn.ops.vertical_slash_args import vertical_slash_output_sizes

from conftest import assert_close, assert_lse_close, lse_fp64, random_layout

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------- index kernel
def mirror_vertical_slash(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size, bm, bn, causal):
    """csrc/vertical_slash_index.cu, one 'thread' per (b, h, m), after the launcher's sorting."""
    batch, heads, nnz_v = vertical_indexes.shape
    nnz_s = slash_indexes.shape[2]
    n_rows, max_tiles = vertical_slash_output_sizes(context_size, bm, bn, nnz_s)
    block_count = torch.zeros(batch, heads, n_rows, dtype=torch.int32)
    block_offset = torch.zeros(batch, heads, n_rows, max_tiles, dtype=torch.int32)
    column_count = torch.zeros(batch, heads, n_rows, dtype=torch.int32)
    column_index = torch.zeros(batch, heads, n_rows, nnz_v, dtype=torch.int32)
    verticals = vertical_indexes.long().sort(-1).values.tolist()
    slashes = slash_indexes.long().sort(-1, descending=True).values.tolist()
    for b in range(batch):
        q_len, kv_len = int(q_seqlens[b]), int(kv_seqlens[b])
        n_qb = -(-q_len // bm)
        for h in range(heads):
            for m in range(min(n_rows, n_qb)):
                shift = kv_len - q_len
                p0 = m * bm + shift
                p1 = min((m + 1) * bm, q_len) - 1 + shift
                limit = p1 + 1 if causal else kv_len
                key_end = min(limit, kv_len)
                offsets, is_open, g_start, g_end = [], False, 0, 0
                for s in slashes[b][h]:
                    start, end = max(p0 - s, 0), min(p1 - s + 1, key_end)
                    if end <= start:
                        continue
                    if is_open and start < g_end + bn:
                        g_end = max(g_end, end)
                        continue
                    if is_open:
                        offsets += list(range(g_start, g_end, bn))
                    is_open, g_start, g_end = True, start, end
                if is_open:
                    offsets += list(range(g_start, g_end, bn))
                offsets = offsets[:max_tiles]
                block_count[b, h, m] = len(offsets)
                block_offset[b, h, m, :len(offsets)] = torch.tensor(offsets, dtype=torch.int32)
                cols, t, vs = [], 0, verticals[b][h]
                for i, v in enumerate(vs):
                    if i > 0 and v == vs[i - 1]:
                        continue
                    if v < 0:
                        continue
                    if v >= limit:
                        break
                    while t < len(offsets) and offsets[t] + bn <= v:
                        t += 1
                    if t < len(offsets) and offsets[t] <= v:
                        continue
                    cols.append(v)
                column_count[b, h, m] = len(cols)
                column_index[b, h, m, :len(cols)] = torch.tensor(cols, dtype=torch.int32)
    return block_count, block_offset, column_count, column_index


def random_index_case(rng, causal):
    batch, heads = rng.randint(1, 3), rng.randint(1, 3)
    bm, bn = rng.choice([(64, 64), (32, 16), (16, 32), (64, 8), (8, 64)])
    context = rng.randint(1, 300)
    lens = []
    for _ in range(batch):
        kv = rng.randint(0, context)
        lens.append((rng.randint(0, kv), kv))
    nnz_v, nnz_s = rng.randint(0, 12), rng.randint(0, 8)
    # unsorted, duplicates, negatives and positions past the sequence: all must be handled as the torch path does
    vert = torch.tensor([[[rng.randint(-5, context + 5) for _ in range(nnz_v)] for _ in range(heads)]
                         for _ in range(batch)], dtype=torch.int64).reshape(batch, heads, nnz_v)
    slash = torch.tensor([[[rng.choice([rng.randint(-3, 5), rng.randint(0, context + 10)]) for _ in range(nnz_s)]
                           for _ in range(heads)] for _ in range(batch)], dtype=torch.int64).reshape(batch, heads, nnz_s)
    dtype = rng.choice([torch.int32, torch.int64])
    q_lens = torch.tensor([q for q, _ in lens], dtype=torch.int32)
    kv_lens = torch.tensor([kv for _, kv in lens], dtype=torch.int32)
    return q_lens, kv_lens, vert.to(dtype), slash.to(dtype), context, bm, bn, causal


@pytest.mark.parametrize("causal", [True, False])
def test_index_kernel_logic_equals_torch_conversion(causal):
    rng = random.Random(7 + causal)
    for _ in range(60):
        case = random_index_case(rng, causal)
        expected = convert_vertical_slash_indexes(*case[:7], causal=causal)
        got = mirror_vertical_slash(*case)
        for name, e, g in zip(("block_count", "block_offset", "column_count", "column_index"), expected, got):
            assert torch.equal(e, g), f"{name} differs for case {case}"


# ---------------------------------------------------------------------------------------------------- attention
def mirror_sparse_attention(q, k, v, layout, *, causal, scale, keys=cuda._ATT_KEYS, rows=cuda._ATT_ROWS):
    """csrc/sparse_attention.cu: per (b, h, m) block, passes of `rows` query rows, tiles then columns in chunks
    of `keys` keys, fp32 scores in log2 units, online softmax with the kernel's -inf rules."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = torch.zeros(B, Hq, Lq, D)
    lse = torch.full((B, Hq, Lq), NEG_INF)
    shift = Lk - Lq
    scale_log2 = torch.tensor(scale * 1.4426950408889634, dtype=torch.float32)
    for b in range(B):
        for h in range(Hq):
            kh, vh = k[b, h // group].float(), v[b, h // group].float()
            for m in range(layout.num_query_blocks):
                n_tiles, n_cols = int(layout.block_count[b, h, m]), int(layout.column_count[b, h, m])
                tiles, cols = layout.block_offset[b, h, m].tolist(), layout.column_index[b, h, m].tolist()
                block_end = min((m + 1) * layout.block_m, Lq)
                for row0 in range(m * layout.block_m, block_end, rows):
                    rows_in_pass = min(rows, block_end - row0)
                    first_row_pos = row0 + shift
                    key_end = min(Lk, first_row_pos + rows_in_pass) if causal else Lk
                    sq = q[b, h, row0:row0 + rows_in_pass].float() * scale_log2
                    pos = torch.arange(rows_in_pass) + first_row_pos
                    state = [torch.full((rows_in_pass,), NEG_INF), torch.zeros(rows_in_pass),
                             torch.zeros(rows_in_pass, D)]
                    chunks = []
                    for i in range(n_tiles):
                        first, last = max(tiles[i], 0), min(tiles[i] + layout.block_n, key_end)
                        for n0 in range(first, last, keys):
                            chunks.append([n0 + t if n0 + t < last else -1 for t in range(keys)])
                    for c0 in range(0, n_cols, keys):
                        chunk = [cols[c0 + t] if c0 + t < n_cols else -1 for t in range(keys)]
                        chunks.append([c if 0 <= c < key_end else -1 for c in chunk])
                    for key_pos in chunks:
                        _attend_chunk(sq, kh, vh, torch.tensor(key_pos), pos, causal, state)
                    row_max, row_sum, acc = state
                    inv = torch.where(row_sum > 0, 1.0 / row_sum, 0.0)
                    out[b, h, row0:row0 + rows_in_pass] = acc * inv[:, None]
                    lse[b, h, row0:row0 + rows_in_pass] = torch.where(
                        row_sum > 0, (row_max + torch.log2(row_sum)) * math.log(2), NEG_INF)
    return out.to(q.dtype), lse


def _attend_chunk(sq, kh, vh, key_pos, pos, causal, state):
    row_max, row_sum, acc = state
    valid_key = key_pos >= 0
    safe = key_pos.clamp(min=0)
    sk = torch.where(valid_key[:, None], kh[safe], 0.0)
    sv = torch.where(valid_key[:, None], vh[safe], 0.0)
    s = sq @ sk.T                                                             # [rows, keys], log2 units
    visible = valid_key[None, :] & ((key_pos[None, :] <= pos[:, None]) if causal else True)
    s = torch.where(visible, s, NEG_INF)
    new_max = torch.maximum(row_max, s.max(-1).values)
    none = new_max == NEG_INF
    alpha = torch.where(none, 1.0, torch.exp2(row_max - new_max))
    p = torch.where(none[:, None], 0.0, torch.exp2(s - new_max[:, None]))
    state[1] = row_sum * alpha + p.sum(-1)
    state[0] = new_max
    state[2] = acc * alpha[:, None] + p @ sv


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,bm,bn", [
    (2, 4, 2, 65, 113, 16, 64, 64),     # GQA, Lq < Lk, partial last block
    (1, 3, 1, 130, 130, 8, 100, 40),    # MQA, block_m > ROWS: two passes per block; block_n > KEYS
    (2, 2, 2, 63, 1000, 8, 16, 8),      # MHA, long keys: many tiles, > KEYS columns per block
    (1, 2, 1, 1, 63, 16, 64, 64),       # a single query row
])
def test_attention_kernel_logic_matches_oracle(causal, B, Hq, Hkv, Lq, Lk, D, bm, bn):
    rng = random.Random(B * 1000 + Lq + Lk + causal)
    q, k, v = (torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(s))
               for s, (H, L) in enumerate(((Hq, Lq), (Hkv, Lk), (Hkv, Lk))))
    layout, _, _ = random_layout(rng, B, Hq, Lq, Lk, bm, bn, p_column=0.5)
    layout.check_indices()
    scale = D ** -0.5
    out, lse = mirror_sparse_attention(q, k, v, layout, causal=causal, scale=scale)
    mask = layout.to_mask()
    ref, ref_lse = sa.reference_attention(q, k, v, mask, causal=causal, return_lse=True)
    assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert_lse_close(lse, lse_fp64(q, k, mask, causal=causal).float(), atol=2e-5, rtol=2e-5)
    assert bool(torch.isneginf(lse).any()) == bool((~(mask & sa_causal(Lq, Lk, causal))).all(-1).any())


def sa_causal(Lq, Lk, causal):
    rows = torch.arange(Lq)[:, None] + (Lk - Lq)
    return torch.arange(Lk)[None, :] <= rows if causal else torch.ones(Lq, Lk, dtype=torch.bool)


def test_attention_kernel_logic_empty_rows_and_empty_layout():
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 1, 100, 8), torch.randn(1, 1, 100, 8)
    z3, z4 = torch.zeros(1, 2, 1, dtype=torch.int32), torch.zeros(1, 2, 1, 1, dtype=torch.int32)
    layout = sa.SparseLayout(z3, z4, z3, z4, q_len=40, k_len=100)
    out, lse = mirror_sparse_attention(q, k, v, layout, causal=True, scale=0.3)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    # a tile partly after the rows' positions under causal: the early rows see nothing (0, -inf), as in torch
    late = sa.SparseLayout(torch.ones_like(z3), torch.full_like(z4, 90), z3, z4, q_len=40, k_len=100, block_m=64)
    out, lse = mirror_sparse_attention(q, k, v, late, causal=True, scale=0.3)
    t_out, t_lse = sa.sparse_attention(q, k, v, late, causal=True, scale=0.3, backend="torch", return_lse=True)
    assert_close(out, t_out, atol=1e-6)
    assert_lse_close(lse, t_lse)
