"""Sparse attention over a SparseLayout with plain torch ops: the CPU path (and a fallback on any device).

Work is split into *items*: one (batch, query head, run of ``rows_per_item`` query rows).  Consecutive query blocks
mostly share keys (the same columns, slash bands that move by one block), so each item gathers the **union** of its
query blocks' keys once, then runs one GEMM against it; keys a query block does not list are masked out, so the
result is exactly attention over each block's own keys.  Memory is O(items_per_chunk x (union + Lk)), never
O(Lq x Lk).  The readable per-key definition is `ops.reference.reference_attention` with `SparseLayout.to_mask`.
"""
from __future__ import annotations

import torch

from ..layout import SparseLayout


def _key_union_bitmap(layout: SparseLayout, items: torch.Tensor, blocks_per_item: int, causal: bool):
    """Bool [n_items, Lk]: keys listed by any query block of each item, cut at the item's last visible key."""
    bc, bo, cc, ci, limit = _item_views(layout, items, blocks_per_item, causal)
    n, Lk, bn = items.shape[0], layout.k_len, layout.block_n
    used_t = torch.arange(bo.shape[-1], device=bo.device) < bc[..., None]
    diff = torch.zeros(n, Lk + 1, dtype=torch.int32, device=bo.device)
    start = torch.where(used_t, bo, Lk).reshape(n, -1)
    end = torch.where(used_t, (bo + bn).clamp(max=Lk), Lk).reshape(n, -1)
    ones = torch.ones_like(start, dtype=torch.int32)
    diff.scatter_add_(1, start, ones).scatter_add_(1, end, -ones)
    union = diff.cumsum(1, dtype=torch.int32)[:, :Lk] > 0
    if ci.shape[-1]:
        used_c = torch.arange(ci.shape[-1], device=ci.device) < cc[..., None]
        cols = torch.zeros(n, Lk + 1, dtype=torch.bool, device=ci.device)
        cols.scatter_(1, torch.where(used_c, ci, Lk).reshape(n, -1), True)
        union |= cols[:, :Lk]
    union &= torch.arange(Lk, device=bo.device) < limit[:, None]
    return union


def _item_views(layout: SparseLayout, items: torch.Tensor, blocks_per_item: int, causal: bool):
    """Index data of the query blocks of each item: counts [n, C], offsets [n, C, MB], column counts [n, C],
    columns [n, C, MC] (int64), and one past the last key the item may see [n]."""
    B, H, n_qb = layout.block_count.shape
    C = blocks_per_item
    n_items_per_head = -(-n_qb // C)
    pad = n_items_per_head * C - n_qb

    def per_item(t):
        t = t.reshape(B * H, n_qb, *t.shape[3:])
        if pad:
            t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(B * H * n_items_per_head, C, *t.shape[2:]).index_select(0, items)

    bc, cc = per_item(layout.block_count).long(), per_item(layout.column_count).long()
    bo, ci = per_item(layout.block_offset).long(), per_item(layout.column_index).long()
    last_row = ((items % n_items_per_head + 1) * C * layout.block_m).clamp(max=layout.q_len) - 1
    limit = last_row + (layout.k_len - layout.q_len) + 1 if causal else torch.full_like(items, layout.k_len)
    return bc, bo, cc, ci, limit


def _pack_union(union: torch.Tensor):
    """Sorted key lists of a bool bitmap [n, Lk]: keys [n, U] (padding repeats key 0) and their validity."""
    counts = union.sum(1)
    width = max(int(counts.max()), 1)
    rows, keys = union.nonzero(as_tuple=True)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(rows.shape[0], device=union.device) - starts[rows]
    packed = torch.zeros(union.shape[0], width, dtype=torch.long, device=union.device)
    packed[rows, slot] = keys
    valid = torch.arange(width, device=union.device) < counts[:, None]
    return packed, valid


def _membership(layout, keys, valid, bc, bo, cc, ci):
    """Bool [n, C, U]: whether query block c of each item lists key u (tile or column)."""
    n, C = bc.shape
    big = torch.iinfo(torch.int64).max
    k = keys[:, None, :].expand(n, C, keys.shape[1]).contiguous()
    used_t = torch.arange(bo.shape[-1], device=bo.device) < bc[..., None]
    offsets = torch.where(used_t, bo, big).sort(-1).values
    member = layout.covered_by_tiles(k, offsets, offsets != big)
    if ci.shape[-1]:
        used_c = torch.arange(ci.shape[-1], device=ci.device) < cc[..., None]
        cols = torch.where(used_c, ci, big).sort(-1).values.contiguous()
        pos = torch.searchsorted(cols, k).clamp(max=cols.shape[-1] - 1)
        member |= cols.gather(-1, pos) == k
    return member & valid[:, None, :]


def torch_sparse_attention(q, k, v, layout: SparseLayout, *, causal: bool = True, scale: float,
                           return_lse: bool = False, rows_per_item: int = 256, chunk_bytes: int = 24 << 20):
    """Attention of ``q [B, Hq, Lq, D]`` over the keys of ``layout`` in ``k, v [B, Hkv, Lk, D]``.

    Inputs are assumed checked (see `prefill.sparse_attention`).  Computes in fp32 (fp64 for fp64 inputs) and
    returns the output in q's dtype and, with ``return_lse``, the LSE [B, Hq, Lq] in fp32 (-inf, output 0, for a
    row with no visible key)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bm = layout.block_m
    C = max(1, rows_per_item // bm)
    rows = C * bm
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_per_head = -(-layout.num_query_blocks // C)
    n_items = B * Hq * n_per_head
    group = Hq // Hkv

    q_items = torch.nn.functional.pad(q.to(work), (0, 0, 0, n_per_head * rows - Lq))
    q_items = q_items.reshape(n_items, rows, D)
    k_rows = k.to(work).reshape(B * Hkv * Lk, D)
    v_rows = v.to(work).reshape(B * Hkv * Lk, D)
    out = torch.zeros(n_items, rows, D, dtype=work, device=q.device)
    lse = torch.full((n_items, rows), float("-inf"), dtype=torch.float32, device=q.device)

    # Chunks of items small enough to keep their scores in cache; the union bitmap is O(chunk x Lk).
    budget_items = max(1, chunk_bytes // (4 * rows * max(int(layout.key_counts(causal).max()) * 2, 64)))
    budget_items = min(budget_items, max(1, (64 << 20) // (Lk + 1)))
    all_items = torch.arange(n_items, device=q.device)
    row_pos = torch.arange(rows, device=q.device)
    for first in range(0, n_items, budget_items):
        items = all_items[first:first + budget_items]
        bc, bo, cc, ci, limit = _item_views(layout, items, C, causal)
        keys, valid = _pack_union(_key_union_bitmap(layout, items, C, causal))
        member = _membership(layout, keys, valid, bc, bo, cc, ci)           # [n, C, U]
        bh = items // n_per_head
        kv_base = ((bh // Hq) * Hkv + (bh % Hq) // group) * Lk
        flat = (kv_base[:, None] + keys).reshape(-1)
        n, U = keys.shape
        k_sel = k_rows.index_select(0, flat).view(n, U, D)
        v_sel = v_rows.index_select(0, flat).view(n, U, D)
        scores = torch.matmul(q_items[first:first + n].view(n, C, bm, D), k_sel.transpose(1, 2)[:, None])
        scores.mul_(scale)
        scores.masked_fill_(~member[:, :, None, :], float("-inf"))
        if causal:
            _mask_causal_suffix(scores.view(n, rows, U), keys, valid, items, n_per_head, rows, row_pos, Lq, Lk)
        scores = scores.view(n, rows, U)
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        scores.sub_(m).exp_()
        denom = scores.sum(-1, keepdim=True)
        o = torch.matmul(scores, v_sel)
        out[first:first + n] = o / denom.clamp(min=torch.finfo(work).tiny)
        if return_lse:
            lse[first:first + n] = (m + denom.log()).squeeze(-1).float()

    out = out.view(B, Hq, n_per_head * rows, D)[:, :, :Lq].to(q.dtype)
    if not return_lse:
        return out
    return out, lse.view(B, Hq, n_per_head * rows)[:, :, :Lq]


def _mask_causal_suffix(scores, keys, valid, items, n_per_head, rows, row_pos, Lq, Lk):
    """Mask keys after each query row's position.  Keys are sorted and already cut at the item's last row, so
    only the suffix of keys after the item's first row can be masked: touch that slice only."""
    first_pos = (items % n_per_head) * rows + (Lk - Lq)
    after_first = keys > first_pos[:, None]
    start = int((valid & ~after_first).sum(1).min())
    if start >= keys.shape[1]:
        return
    tail = keys[:, None, start:]
    pos = first_pos[:, None, None] + row_pos[None, :, None]
    scores[:, :, start:].masked_fill_(tail > pos, float("-inf"))
