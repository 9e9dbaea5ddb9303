"""Sparse attention over a SparseLayout with plain torch ops: the CPU path (and a fallback on any device).

Work is split into *items*: one (batch, query head, run of ``rows_per_item`` query rows).  Consecutive query blocks
mostly share keys (the same columns, slash bands that move by one block), so each item gathers the **union** of its
query blocks' keys once, then runs one GEMM against it; keys a query block does not list are masked out, so the
result is exactly attention over each block's own keys.  Memory is O(items_per_chunk x (union + Lk)), never
O(Lq x Lk).  The readable per-key definition is `ops.reference.reference_attention` with `SparseLayout.to_mask`.
"""
from __future__ import annotations

import torch

from ..layout import SparseLayout, keys_in_tiles
from .merge import merge_partials


_BIG = 1 << 62     # exactly representable as a float (F.pad takes its value as one)


class _ItemIndex:
    """The layout regrouped by item (``C`` consecutive query blocks of one batch row and head), computed once:
    tile offsets [N, C, MB] and columns [N, C, MC], each sorted per block with padding = _BIG at the end."""

    def __init__(self, layout: SparseLayout, C: int):
        B, H, n_qb = layout.block_count.shape
        self.per_head = -(-n_qb // C)
        pad = self.per_head * C - n_qb

        def regroup(values, valid):
            width = max(int(valid.sum(-1).max()) if valid.numel() else 0, 1)
            t = torch.where(valid, values, _BIG)[..., :width]
            t = torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=_BIG).reshape(B * H, n_qb, width)
            t = torch.nn.functional.pad(t, (0, 0, 0, pad), value=_BIG)
            return t.reshape(B * H * self.per_head, C, width)

        self.offsets = regroup(*layout.sorted_offsets())
        self.columns = regroup(*layout.sorted_columns())

    def union_bitmap(self, items, limit, k_len: int, block_n: int):
        """Bool [n, Lk]: keys listed by any block of each item, cut at ``limit [n]``."""
        n = items.shape[0]
        offsets, columns = self.offsets[items].reshape(n, -1), self.columns[items].reshape(n, -1)
        used = offsets < _BIG
        diff = torch.zeros(n, k_len + 1, dtype=torch.int32, device=items.device)
        ones = used.to(torch.int32)
        diff.scatter_add_(1, torch.where(used, offsets, k_len), ones)
        diff.scatter_add_(1, torch.where(used, (offsets + block_n).clamp(max=k_len), k_len), -ones)
        union = torch.zeros(n, k_len + 1, dtype=torch.bool, device=items.device)
        union.scatter_(1, torch.where(columns < _BIG, columns, k_len), True)
        union = union[:, :k_len] | (diff.cumsum(1, dtype=torch.int32)[:, :k_len] > 0)
        return union & (torch.arange(k_len, device=items.device) < limit[:, None])

    def membership(self, items, keys, valid, block_n: int):
        """Bool [n, C, U]: whether block c of each item lists ``keys`` ([n, U] shared or [n, C, U])."""
        offsets, columns = self.offsets[items], self.columns[items]
        n, C = offsets.shape[:2]
        k = (keys[:, None, :].expand(n, C, keys.shape[-1]) if keys.dim() == 2 else keys).contiguous()
        member = keys_in_tiles(k, offsets, offsets < _BIG, block_n)
        pos = torch.searchsorted(columns, k).clamp(max=columns.shape[-1] - 1)
        member |= columns.gather(-1, pos) == k
        return member & (valid[:, None, :] if valid.dim() == 2 else valid)


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


def _attend(q, k_sel, v_sel, member, scale):
    """Attention of ``q [n, C, bm, D]`` (fp32/fp64) over ``k_sel, v_sel [n, U, D]`` where ``member [n, C, U]``:
    (out [n, C, bm, D], lse [n, C, bm]); rows with no member key give 0 and -inf.  On the CPU this is PyTorch's
    fused flash kernel with a broadcast mask (scores never leave cache); elsewhere plain matmul + softmax."""
    n, C, bm, D = q.shape
    U = k_sel.shape[1]
    bias = torch.zeros(n, C, 1, U, dtype=q.dtype, device=q.device).masked_fill_(~member[:, :, None], float("-inf"))
    if q.device.type == "cpu" and q.dtype == torch.float32 and hasattr(torch.ops.aten,
                                                                      "_scaled_dot_product_flash_attention_for_cpu"):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k_sel[:, None].expand(n, C, U, D), v_sel[:, None].expand(n, C, U, D),
            attn_mask=bias.expand(n, C, bm, U), scale=scale)
    else:
        scores = torch.matmul(q, k_sel.transpose(1, 2)[:, None]).mul_(scale).add_(bias)
        lse = torch.logsumexp(scores, -1)
        out = torch.matmul(torch.exp(scores - lse[..., None]), v_sel[:, None])
    empty = ~member.any(-1)[..., None]                                                   # [n, C, 1]
    out = out.masked_fill(empty[..., None], 0.0)
    lse = lse.to(q.dtype).masked_fill(empty, float("-inf"))
    return out, lse


def torch_sparse_attention(q, k, v, layout: SparseLayout, *, causal: bool = True, scale: float,
                           return_lse: bool = False, rows_per_item: int = 256, chunk_bytes: int = 32 << 20):
    """Attention of ``q [B, Hq, Lq, D]`` over the keys of ``layout`` in ``k, v [B, Hkv, Lk, D]``.

    Inputs are assumed checked (see `prefill.sparse_attention`).  Computes in fp32 (fp64 for fp64 inputs) and
    returns the output in q's dtype and, with ``return_lse``, the LSE [B, Hq, Lq] in fp32 (-inf, output 0, for a
    row with no visible key).

    With ``causal``, keys up to each block's first row are attended as one part with a per-block mask, and the
    keys after it (the diagonal triangle, at most block_m - 1 contiguous keys) as a second, row-masked part; the
    two are merged by LSE."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bm = layout.block_m
    C = max(1, rows_per_item // bm)
    rows = C * bm
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_per_head = -(-layout.num_query_blocks // C)
    n_items = B * Hq * n_per_head
    group = Hq // Hkv

    q_items = torch.nn.functional.pad(q.to(work), (0, 0, 0, n_per_head * rows - Lq)).reshape(n_items, C, bm, D)
    k_rows = k.to(work).reshape(B * Hkv * Lk, D)
    v_rows = v.to(work).reshape(B * Hkv * Lk, D)
    out = torch.empty(n_items, C, bm, D, dtype=work, device=q.device)
    lse = torch.empty(n_items, C, bm, dtype=work, device=q.device)

    index = _ItemIndex(layout, C)
    widest = int(layout.key_counts(causal).max()) if layout.num_query_blocks else 1
    per_chunk = max(1, chunk_bytes // (8 * D * max(2 * widest, 64)))
    per_chunk = min(per_chunk, max(1, (64 << 20) // (Lk + 1)))
    all_items = torch.arange(n_items, device=q.device)
    first_pos = torch.arange(C, device=q.device) * bm + (Lk - Lq)            # block first row, minus item start
    tri = torch.arange(1, bm, device=q.device)                                # diagonal keys: first row + tri
    for first in range(0, n_items, per_chunk):
        items = all_items[first:first + per_chunk]
        n = items.shape[0]
        bh = items // n_per_head
        kv_base = ((bh // Hq) * Hkv + (bh % Hq) // group) * Lk
        p0 = (items % n_per_head)[:, None] * rows + first_pos                  # [n, C]
        # With causal, this part sees keys up to each block's first row; the rest is the diagonal part.
        limit = p0[:, -1] + 1 if causal else torch.full_like(items, Lk)
        keys, valid = _pack_union(index.union_bitmap(items, limit, Lk, layout.block_n))
        member = index.membership(items, keys, valid, layout.block_n)
        if causal:
            member &= keys[:, None, :] <= p0[..., None]
        flat = (kv_base[:, None] + keys).reshape(-1)
        U = keys.shape[1]
        o, l = _attend(q_items[first:first + n], k_rows.index_select(0, flat).view(n, U, D),
                       v_rows.index_select(0, flat).view(n, U, D), member, scale)
        if causal:
            o, l = _merge_diagonal(o, l, q_items[first:first + n], k_rows, v_rows, index, items, p0, tri,
                                   kv_base, scale, Lk, layout.block_n)
        out[first:first + n] = o
        lse[first:first + n] = l

    out = out.view(B, Hq, n_per_head * rows, D)[:, :, :Lq].to(q.dtype)
    if not return_lse:
        return out
    return out, lse.view(B, Hq, n_per_head * rows)[:, :, :Lq].float()


def _merge_diagonal(o, l, q, k_rows, v_rows, index, items, p0, tri, kv_base, scale, Lk, block_n):
    """Add the keys after each block's first row (row-masked causal triangle) to (o, l) by LSE merge."""
    n, C, bm, D = q.shape
    keys = p0[..., None] + tri                                                     # [n, C, bm - 1]
    inside = keys < Lk
    member = index.membership(items, keys.clamp(max=Lk - 1), inside, block_n)
    flat = (kv_base[:, None, None] + keys.clamp(max=Lk - 1)).reshape(-1)
    k_d = k_rows.index_select(0, flat).view(n, C, bm - 1, D)
    v_d = v_rows.index_select(0, flat).view(n, C, bm - 1, D)
    scores = torch.matmul(q, k_d.transpose(-1, -2)).mul_(scale)                   # [n, C, bm, bm - 1]
    visible = member[:, :, None, :] & (tri[None, :] <= torch.arange(bm, device=q.device)[:, None])
    scores.masked_fill_(~visible, float("-inf"))
    l_d = torch.logsumexp(scores, -1)
    p = torch.exp(scores - torch.where(torch.isinf(l_d), 0.0, l_d)[..., None])
    o_d = torch.matmul(p, v_d)
    return merge_partials([o, o_d], [l, l_d])
