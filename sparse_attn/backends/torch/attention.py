"""Sparse attention over a SparseLayout with plain torch ops: runs on any device; on the CPU it is the fallback of
the compiled kernel (`backends.cpu`) and the fp64 path.

Each query block (``block_m`` rows of one batch row and head) gathers the keys its tiles and columns list and
attends to them with two batched matmuls.  With ``causal`` this *main part* takes the keys before the block's
first row (the same for every row, so a per-block mask suffices) and a *diagonal part* takes the ``block_m``
contiguous keys from there on with the causal triangle (read through strided views of the keys, no index
gather); the two are merged by LSE.  Blocks are processed in chunks sorted by key count, so the padding
of a chunk is small; memory is O(chunk x keys per block), never O(Lq x Lk).
The readable per-key definition is `backends.reference.reference_attention` with `SparseLayout.to_mask`.
"""
from __future__ import annotations

import torch

from ...layout import SparseLayout, kept_first, keys_in_tiles, sorted_valid
from ..merge import merge_into

def _attend(q, k_sel, v_sel, bias, scale, softcap=0.0):
    """Attention of ``q [n, bm, D]`` over ``k_sel, v_sel [n, U, D]`` with additive mask ``bias`` (0 / -inf,
    [n, U] or [n, bm, U]; None with ``U == bm`` for the top-left causal triangle, row r seeing keys 0..r):
    (out [n, bm, D], lse [n, bm]); rows with no allowed key give 0 and -inf.  ``softcap > 0`` caps the scaled
    scores (``softcap * tanh(s / softcap)``) before the mask.

    Two batched matmuls around an in-place softmax: the callers bound n x bm x U so the scores stay in cache,
    and at these shapes (64 query rows) this beats PyTorch's fused CPU flash kernel by 5-15% (its query split
    is 32 rows below 192), also on the [bm, bm] causal triangles."""
    n, bm, D = q.shape
    U = k_sel.shape[1]
    if bias is None:
        bias = torch.zeros(bm, U, dtype=q.dtype, device=q.device).masked_fill_(
            torch.ones(bm, U, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    elif bias.dim() == 2:
        bias = bias[:, None, :]
    scores = torch.bmm(q * scale, k_sel.transpose(1, 2))
    if softcap:
        scores.div_(softcap).tanh_().mul_(softcap)
    scores.add_(bias)                                                                  # bias [n or 1, bm or 1, U]
    top = scores.amax(-1, keepdim=True).clamp_(min=torch.finfo(q.dtype).min)       # finite for empty rows
    probs = scores.sub_(top).exp_()
    total = probs.sum(-1, keepdim=True)
    lse = (top + total.log()).squeeze(-1)                                            # -inf for empty rows
    out = torch.bmm(probs, v_sel).div_(total.clamp_(min=torch.finfo(q.dtype).tiny))
    return out, lse


def torch_sparse_attention(q, k, v, layout: SparseLayout, *, causal: bool = True, scale: float,
                           return_lse: bool = False, chunk_bytes: int = 16 << 20, softcap: float = 0.0):
    """Attention of ``q [B, Hq, Lq, D]`` over the keys of ``layout`` in ``k, v [B, Hkv, Lk, D]``.

    Inputs are assumed checked (see `prefill.sparse_attention`).  Computes in fp32 (fp64 for fp64 inputs) and
    returns the output in q's dtype and, with ``return_lse``, the LSE [B, Hq, Lq] in fp32 (-inf, output 0, for a
    row with no visible key)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bm, bn, n_qb = layout.block_m, layout.block_n, layout.num_query_blocks
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    n_blocks = B * Hq * n_qb
    if n_blocks == 0:
        out = q.new_zeros(B, Hq, Lq, D)
        return (out, torch.full((B, Hq, Lq), float("-inf"), device=dev)) if return_lse else out

    q_blocks = torch.nn.functional.pad(q.to(work), (0, 0, 0, n_qb * bm - Lq)).reshape(n_blocks, bm, D)
    k_rows = k.to(work).reshape(B * Hkv * Lk, D)
    v_rows = v.to(work).reshape(B * Hkv * Lk, D)
    bh = torch.arange(B * Hq, device=dev).repeat_interleave(n_qb)
    kv_base = ((bh // Hq) * Hkv + (bh % Hq) // (Hq // Hkv)) * Lk                    # first key row, per block
    first_pos = (torch.arange(n_qb, device=dev) * bm + (Lk - Lq)).repeat(B * Hq)     # position of row 0
    limit = first_pos if causal else torch.full_like(first_pos, Lk)                  # main part: keys < limit
    tile_count = layout.block_count.reshape(-1).long()
    col_count = layout.column_count.reshape(-1).long()
    offsets = layout.block_offset.reshape(n_blocks, -1)                              # int32
    columns = layout.column_index.reshape(n_blocks, -1)

    width_of = tile_count * bn + col_count
    order = torch.argsort(width_of, descending=True)                                 # similar widths together
    widths = width_of[order].tolist()
    # The index work runs in that order; queries are read and outputs written at the blocks' own places.
    kv_base_s, limit_s, tile_count, col_count, offsets, columns = (
        t.index_select(0, order) for t in (kv_base, limit, tile_count, col_count, offsets, columns))
    out = torch.empty(n_blocks, bm, D, dtype=work, device=dev)
    lse = torch.empty(n_blocks, bm, dtype=work, device=dev)
    start = 0
    while start < n_blocks:
        # Index work for a batch of blocks at once (bounded memory), then small gather + kernel steps that keep
        # the gathered keys in cache.
        batch = slice(start, start + max(1, (64 << 20) // (16 * max(widths[start], 1))))
        flat, bias, count_t = _main_keys(offsets[batch], tile_count[batch], columns[batch], col_count[batch],
                                         limit_s[batch], kv_base_s[batch], Lk, bn, work)
        counts = count_t.tolist()
        s = 0
        while s < len(counts):
            n = max(1, chunk_bytes // (2 * 4 * D * counts[s] + 4 * bm * D))
            n = min(n, len(counts) - s)
            width = max(max(counts[s:s + n]), 1)
            idx = flat[s:s + n, :width].reshape(-1)
            blocks = order[batch.start + s:batch.start + s + n]
            o, l = _attend(q_blocks.index_select(0, blocks), k_rows.index_select(0, idx).view(n, width, D),
                           v_rows.index_select(0, idx).view(n, width, D), bias[s:s + n, :width], scale, softcap)
            out.index_copy_(0, blocks, o)
            lse.index_copy_(0, blocks, l)
            s += n
        start += len(counts)
    if causal:
        _add_diagonal(out, lse, q_blocks, k_rows, v_rows, layout, kv_base, first_pos, Hkv, scale, chunk_bytes,
                      softcap)

    out = out.view(B, Hq, n_qb * bm, D)[:, :, :Lq].to(q.dtype)
    if not return_lse:
        return out
    return out, lse.view(B, Hq, n_qb * bm)[:, :, :Lq].float()


def _main_keys(offsets, tile_count, columns, col_count, limit, kv_base, Lk, bn, work):
    """For blocks with tiles ``offsets [n, T]`` and ``columns [n, C]`` (counts per block; any order): the key
    rows to gather (flat indices into the [B * Hkv * Lk] key rows) and the additive mask (0 / -inf) of the main
    part (keys below ``limit``), with the keys some row may see first: ([n, W], [n, W], their number [n]).
    Compaction works on whole tiles (a tile that starts below the limit is kept, its keys past it masked), so
    its cost is per tile, not per key; the [n, W] work is a few int32 passes."""
    n, dev = offsets.shape[0], offsets.device
    nt, nc = int(tile_count.max()), int(col_count.max())
    lim = limit.clamp(max=Lk).to(torch.int32)[:, None]
    offsets, columns = offsets[:, :nt].to(torch.int32), columns[:, :nc].to(torch.int32)
    tile_ok = (torch.arange(nt, device=dev) < tile_count[:, None]) & (offsets < lim)
    col_ok = (torch.arange(nc, device=dev) < col_count[:, None]) & (columns < lim)
    n_tiles, n_cols = tile_ok.sum(1, dtype=torch.int32), col_ok.sum(1, dtype=torch.int32)
    wt, wc = int(n_tiles.max()), int(n_cols.max())
    tiles = offsets.gather(1, kept_first(tile_ok, wt))
    cols = columns.gather(1, kept_first(col_ok, wc))
    # Slot j of a block holds key j of its kept tiles, then (from end_t on) its kept columns, then padding: a
    # chunk's width is its longest block, not max tiles + max columns.
    width = max(wt * bn + wc, 1)
    slot = torch.arange(width, dtype=torch.int32, device=dev)
    end_t = (n_tiles * bn)[:, None]
    in_tiles = slot < end_t                                                           # [n, W]
    if wt:
        tile_keys = tiles.gather(1, (slot // bn).clamp(max=wt - 1).long().expand(n, -1)).add_(slot % bn)
    else:
        tile_keys = torch.zeros(n, width, dtype=torch.int32, device=dev)
    if wc:
        col_keys = cols.gather(1, (slot - end_t).clamp_(min=0, max=wc - 1).long())
        keys = torch.where(in_tiles, tile_keys, col_keys)
    else:
        keys = tile_keys
    allowed = torch.where(in_tiles, tile_keys < lim, slot < end_t + n_cols[:, None])
    flat = keys.clamp_(min=0, max=Lk - 1).to(kv_base.dtype).add_(kv_base[:, None])           # padding may hold any value
    bias = torch.zeros(allowed.shape, dtype=work, device=dev).masked_fill_(~allowed, float("-inf"))
    return flat, bias, (n_tiles * bn + n_cols).long()


def _add_diagonal(out, lse, q_blocks, k_rows, v_rows, layout, kv_base, first, Hkv, scale, chunk_bytes, softcap):
    """Merge in place into ``out [n_blocks, bm, D]``, ``lse [n_blocks, bm]`` (blocks in layout order: batch, head, query
    block) the keys each block lists from its first row's position on; row r sees those at or before its own
    position (``first [n_blocks]``: position of row 0; ``kv_base``: first key row of its KV head).  Blocks listing
    all of these keys (the common case: a local band) take the causal triangle over strided views of the keys (no
    index gather); the others a per-row mask."""
    n_blocks, bm, D = q_blocks.shape
    B, Hq, n_qb = layout.batch, layout.heads, layout.num_query_blocks
    Lq, Lk = layout.q_len, layout.k_len
    full = _lists_all_diagonal_keys(layout, first)
    o, l = _causal_diagonal(q_blocks, k_rows, v_rows, B, Hq, Hkv, n_qb, Lq, Lk, scale, chunk_bytes, softcap)
    partial = (~full).nonzero().squeeze(1)
    if partial.numel():                               # rare: keys missing inside the diagonal block
        at = (partial % n_qb, partial // n_qb)
        o[at], l[at] = _masked_diagonal(q_blocks, k_rows, v_rows, layout, first[partial], kv_base[partial],
                                        partial, scale, chunk_bytes, softcap)
    # merge in the diagonal part's [query block, head] order through views of out (no reordering copy)
    merge_into(out.view(B * Hq, n_qb, bm, D).transpose(0, 1), lse.view(B * Hq, n_qb, bm).transpose(0, 1), o, l)


def _lists_all_diagonal_keys(layout, first):
    """Bool [n_blocks]: whether each block lists every key in [first, first + block_m) below k_len.  Counts the
    keys its tiles and columns put in that range (a valid layout lists no key twice), no per-key work."""
    bm, bn, Lk = layout.block_m, layout.block_n, layout.k_len
    n = first.shape[0]
    lo, hi = first[:, None], (first + bm).clamp(max=Lk)[:, None]
    offsets = layout.block_offset.reshape(n, -1)
    tiles_ok = torch.arange(offsets.shape[1], device=first.device) < layout.block_count.reshape(n, 1)
    overlap = (torch.minimum(offsets + bn, hi) - torch.maximum(offsets, lo)).clamp(min=0)
    columns = layout.column_index.reshape(n, -1)
    cols_ok = torch.arange(columns.shape[1], device=first.device) < layout.column_count.reshape(n, 1)
    in_range = (columns >= lo) & (columns < hi) & cols_ok
    return (overlap * tiles_ok).sum(1) + in_range.sum(1) == (hi - lo).squeeze(1)


def _causal_diagonal(q_blocks, k_rows, v_rows, B, Hq, Hkv, n_qb, Lq, Lk, scale, chunk_bytes, softcap):
    """Every block's causal attention over the ``bm`` keys from its first row's position, in query-block-major
    order: (out [n_qb, B * Hq, bm, D], lse [n_qb, B * Hq, bm]).  Keys past Lk (last block, padding rows only)
    read zeros."""
    n_blocks, bm, D = q_blocks.shape
    rows = n_qb * bm + (Lk - Lq)                       # key rows the last block reaches, per KV head
    k_heads, v_heads = k_rows.view(B * Hkv, Lk, D), v_rows.view(B * Hkv, Lk, D)
    if rows > Lk:
        pad = (0, 0, 0, rows - Lk)
        k_heads, v_heads = torch.nn.functional.pad(k_heads, pad), torch.nn.functional.pad(v_heads, pad)
    q4 = q_blocks.view(B * Hq, n_qb, bm, D).transpose(0, 1)                          # [n_qb, B*Hq, bm, D]
    size, stride = (n_qb, B * Hkv, bm, D), (bm * D, k_heads.shape[1] * D, D, 1)
    k4 = k_heads.as_strided(size, stride, k_heads.storage_offset() + (Lk - Lq) * D)
    v4 = v_heads.as_strided(size, stride, v_heads.storage_offset() + (Lk - Lq) * D)
    # a few query blocks at a time (scores are [bm, bm] per block and head); GQA by repeating only the step's keys
    group = Hq // Hkv
    o = torch.empty(n_qb, B * Hq, bm, D, dtype=q_blocks.dtype, device=q_blocks.device)
    l = torch.empty(n_qb, B * Hq, bm, dtype=q_blocks.dtype, device=q_blocks.device)
    step = max(1, chunk_bytes // (B * Hq * bm * max(bm, D) * q_blocks.element_size() * 2))
    for j in range(0, n_qb, step):
        js = slice(j, j + step)
        kj, vj = k4[js].repeat_interleave(group, 1), v4[js].repeat_interleave(group, 1)
        oj, lj = _attend(q4[js].reshape(-1, bm, D), kj.reshape(-1, bm, D), vj.reshape(-1, bm, D), None, scale,
                         softcap)
        o[js], l[js] = oj.view_as(o[js]), lj.view_as(l[js])
    return o, l


def _masked_diagonal(q_blocks, k_rows, v_rows, layout, first, kv_base, blocks, scale, chunk_bytes, softcap):
    """The diagonal part of ``blocks`` (long [n]; ``first``, ``kv_base`` [n]: theirs) with a per-row mask of the
    keys they list."""
    bm, D = q_blocks.shape[1], q_blocks.shape[2]
    Lk, dev = layout.k_len, q_blocks.device
    n_all = q_blocks.shape[0]
    offsets, valid_o = sorted_valid(layout.block_offset.reshape(n_all, -1)[blocks],
                                    layout.block_count.reshape(n_all)[blocks])
    columns, valid_c = sorted_valid(layout.column_index.reshape(n_all, -1)[blocks],
                                    layout.column_count.reshape(n_all)[blocks])
    step = torch.arange(bm, device=dev)
    visible = step[None, :] <= step[:, None]                                         # [bm, bm]: key u <= row r
    outs, lses = [], []
    per_chunk = max(1, chunk_bytes // (4 * bm * bm * 4))
    for s in range(0, blocks.shape[0], per_chunk):
        sl = slice(s, s + per_chunk)
        keys = first[sl, None] + step                                         # [n, bm]
        listed = keys_in_tiles(keys, offsets[sl], valid_o[sl], layout.block_n)
        if columns.shape[-1]:
            pos = torch.searchsorted(columns[sl].contiguous(), keys).clamp(max=columns.shape[-1] - 1)
            listed |= valid_c[sl].gather(-1, pos) & (columns[sl].gather(-1, pos) == keys)
        listed &= keys < Lk
        flat = (kv_base[sl, None] + keys.clamp(max=Lk - 1)).reshape(-1)
        n = keys.shape[0]
        allowed = listed[:, None, :] & visible
        bias = torch.zeros(allowed.shape, dtype=q_blocks.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        o, l = _attend(q_blocks[blocks[sl]], k_rows.index_select(0, flat).view(n, bm, D),
                       v_rows.index_select(0, flat).view(n, bm, D), bias, scale, softcap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)
