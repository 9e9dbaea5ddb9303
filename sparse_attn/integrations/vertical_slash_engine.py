"""vLLM's / SGLang's ``convert_vertical_slash_indexes`` as the engines' CUDA kernel computes it, key for key.

The engines walk, per (batch, head, query block), the slashes (descending distances, so their key ranges come in
ascending order) and the verticals (ascending) together:

* query block ``m`` covers rows ``[m * M, (m + 1) * M)``; ``E`` is one past its last row's position: with
  ``causal`` the rows sit at the end of the keys (``kv_len - q_len + row``), without it *after* the last key
  (``kv_len + row``: the "succ"/"inter" stages of dual-chunk attention);
* slash ``s`` stands for the ``M``-key chunk ending at ``x = max(E - s, M)`` (so chunks near key 0 are clamped to
  ``[0, M)``); slashes with ``s >= E`` are skipped, and without ``causal`` only slashes ``>= m * M`` after the first
  used one are read;
* consecutive chunks merge into a group: a chunk ending within ``M`` keys past the group's end extends the group
  by exactly ``M`` keys, a later one starts a new group; each group ``[a, e)`` becomes tiles ``a, a + N, ...`` below
  ``min(e, kv_len)``; with no usable slash the group is ``[E, E + N)`` (causal) or ``[kv_len, kv_len + N)``;
* a vertical inside a group is dropped (the tiles hold it); one outside every group becomes a column if it lies
  before the last group's end, or (without ``causal`` only) before ``kv_len``: with ``causal`` the verticals past
  the last slash range are dropped.

`engine_convert` computes this with tensor ops over all heads and query blocks at once (one loop step per slash,
because a group's extent depends on the chunks before it); `engine_convert_walk` is the readable per-block walk it
is tested against.  The vectorised path needs the order the engines' callers use (verticals ascending, slashes
descending); other orders go through `engine_convert_unsorted`, the walk for every block.
"""
from __future__ import annotations

import torch

from ..layout import ceil_div, keys_in_tiles
from ..estimators.tiles import compact

_BIG = torch.iinfo(torch.int64).max // 4




def engine_output_widths(nnz_v: int, nnz_s: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(tile slots, column slots) of the outputs: the engines' ``NNZ_S`` and ``NNZ_V``.  With ``block_m > block_n``
    a chunk can hold several tiles and the engines write past ``NNZ_S``; here the width grows instead."""
    return nnz_s * max(1, ceil_div(block_m, block_n)), nnz_v


def engine_convert(q_lens, kv_lens, vertical, slash, v_counts, s_counts, context_size: int, block_m: int,
                   block_n: int, causal: bool):
    """The engines' index tensors ``(block_count, block_offset, column_count, column_index)`` (int32).

    ``q_lens``, ``kv_lens``: lists (one per batch entry); ``vertical [B, H, NV]`` ascending and ``slash [B, H, NS]``
    descending (over each head's first ``v_counts[h]`` / ``s_counts[h]`` entries, int64 ``[H]``; the rest is
    padding).  Rows: ``ceil(context_size / block_m)``; rows past an entry's queries are 0."""
    B, H, NV = vertical.shape
    NS = slash.shape[2]
    dev = vertical.device
    n_rows = ceil_div(context_size, block_m)
    width_t, width_c = engine_output_widths(NV, NS, block_m, block_n)
    block_count = torch.zeros(B, H, n_rows, dtype=torch.int32, device=dev)
    block_offset = torch.zeros(B, H, n_rows, width_t, dtype=torch.int32, device=dev)
    column_count = torch.zeros(B, H, n_rows, dtype=torch.int32, device=dev)
    column_index = torch.zeros(B, H, n_rows, width_c, dtype=torch.int32, device=dev)
    for b in range(B):                        # entries differ in length; heads and query blocks go together
        n_qb = min(ceil_div(q_lens[b], block_m), n_rows)
        if n_qb == 0:
            continue
        bc, bo, cc, ci = _one_entry(q_lens[b], kv_lens[b], n_qb, vertical[b].long(), slash[b].long(), v_counts,
                                    s_counts, block_m, block_n, causal, width_t)
        block_count[b, :, :n_qb], block_offset[b, :, :n_qb] = bc, bo
        column_count[b, :, :n_qb], column_index[b, :, :n_qb] = cc, ci
    return block_count, block_offset, column_count, column_index


def _one_entry(q_len, kv_len, n_qb, V, S, v_counts, s_counts, M, N, causal, width_t):
    H, NS = S.shape
    dev = S.device
    start = torch.arange(n_qb, device=dev) * M                                       # query rows, not positions
    E = (kv_len - q_len if causal else kv_len) + start + M                          # [nQb]
    E2 = E.expand(H, n_qb).contiguous()
    in_count = torch.arange(NS, device=dev) < s_counts[:, None]                       # [H, NS]
    # Slashes are descending: "how many lead slashes are >= t" is a searchsorted on the negated values (padding
    # made the smallest so it never counts).
    neg = torch.where(in_count, -S, _BIG).contiguous()
    n_ge_E = torch.searchsorted(neg, -E2, right=True)                                 # [H, nQb]
    ns = s_counts[:, None].expand(H, n_qb)
    j0 = torch.minimum(n_ge_E, (ns - 1).clamp(min=0))                                # first slash used
    s0 = S.gather(1, j0.clamp(max=max(NS - 1, 0))) if NS else torch.zeros_like(E2)
    has_slash = (ns > 0) & (s0 <= E2)
    if causal:
        j1 = ns
    else:                                   # later slashes are read while >= the block's first row index
        j1 = torch.maximum(torch.searchsorted(neg, -start.expand(H, n_qb).contiguous(), right=True), j0 + 1)
    # The walk: one step per slash for every (head, query block) at once.  chunk_start holds each chunk [c, c + M)
    # in ascending order (int32: it is as large as the output); group_start its group's first key, the tiles' grid,
    # needed only when M != N (with M == N every chunk is exactly one tile).
    slots = NS + 1
    big = torch.iinfo(torch.int32).max
    chunk_start = torch.full((H, n_qb, slots), big, dtype=torch.int32, device=dev)
    group_start = torch.zeros((H, n_qb, slots), dtype=torch.int32, device=dev) if M != N else None
    r_end = (E2 - s0).clamp(min=M)
    r_start = r_end - M
    n_chunks = has_slash.long()
    chunk_start[..., 0] = torch.where(has_slash, r_start, big)
    if group_start is not None:
        group_start[..., 0] = r_start
    trash = torch.full_like(n_chunks, slots - 1)
    lo = int(j0.min()) + 1 if NS else 0
    hi = int(torch.where(has_slash, j1, 0).max()) if NS else 0
    for j in range(lo, hi):
        active = has_slash & (j0 < j) & (j < j1)
        x = (E2 - S[:, j, None]).clamp(min=M)
        new = active & (x > r_end + M)
        ext = active & ~new & (x > r_end)
        event = new | ext
        c = torch.where(new, x - M, r_end)
        r_start = torch.where(new, x - M, r_start)
        slot = torch.where(event, n_chunks, trash)[..., None]
        chunk_start.scatter_(2, slot, torch.where(event, c, big).to(torch.int32)[..., None])
        if group_start is not None:
            group_start.scatter_(2, slot, r_start.to(torch.int32)[..., None])
        r_end = torch.where(new, x, torch.where(ext, r_end + M, r_end))
        n_chunks = n_chunks + event.long()
    chunk_start[..., slots - 1] = big                                                # the trash slot
    valid_chunk = chunk_start < big
    no_slash_start = E2 if causal else torch.full_like(E2, kv_len)
    lone = ~has_slash & (no_slash_start < kv_len)                                   # the no-slash group's tile
    if M == N:
        # chunks ascend, so those starting inside the keys come first: the tiles are a prefix, no compaction
        bc = torch.where(lone, 1, (chunk_start < kv_len).sum(-1)).clamp(max=width_t).to(torch.int32)
        bo = torch.where(lone[..., None], no_slash_start[..., None].to(torch.int32), chunk_start)[..., :width_t]
        bo = torch.where(torch.arange(bo.shape[-1], device=dev) < bc[..., None], bo, 0)
        if bo.shape[-1] < width_t:                                                    # NS == 0: width 0 anyway
            bo = torch.nn.functional.pad(bo, (0, width_t - bo.shape[-1]))
    else:
        # the group's grid points a + i N inside each chunk, below kv_len (at most ceil(M / N) per chunk)
        per_chunk = max(1, ceil_div(M, N))
        cs, gs = chunk_start.long(), group_start.long()
        first = gs + ((cs - gs + N - 1) // N) * N
        cand = first[..., None] + N * torch.arange(per_chunk, device=dev)              # [H, nQb, slots, per_chunk]
        limit = torch.minimum(cs + M, torch.full_like(cs, kv_len))[..., None]
        tile_ok = valid_chunk[..., None] & (cand < limit)
        tiles = torch.cat([no_slash_start[..., None], cand.flatten(2)], -1)
        tiles_ok = torch.cat([lone[..., None], tile_ok.flatten(2)], -1)
        bc, bo = compact(tiles, tiles_ok, width_t)
    # Columns: verticals outside every group (chunks, or the no-slash group), in their order.
    nv = v_counts[:, None, None]
    vert = V[:, None, :].expand(H, n_qb, V.shape[-1])
    keep = torch.arange(V.shape[-1], device=dev) < nv
    keep = keep & ~keys_in_tiles(vert, chunk_start, valid_chunk, M)
    lone_range = ~has_slash[..., None] & (vert >= no_slash_start[..., None]) & (vert < no_slash_start[..., None] + N)
    keep &= ~lone_range
    last_end = torch.where(has_slash, r_end, no_slash_start + N)[..., None]
    keep &= (vert < last_end) if causal else ((vert < last_end) | (vert < kv_len))
    cc, ci = compact(vert, keep, V.shape[-1])
    return bc, bo, cc, ci


def engine_convert_unsorted(q_lens, kv_lens, vertical, slash, v_counts, s_counts, context_size: int, block_m: int,
                            block_n: int, causal: bool):
    """`engine_convert` for indexes not sorted as the engines expect: the engines' kernel then still gives a
    definite answer (it walks the entries in the given order), which only the per-block walk reproduces.  Plain
    Python over every (batch, head, query block): for odd inputs, not for the hot path (the engines' callers
    sort)."""
    B, H, NV = vertical.shape
    NS = slash.shape[2]
    n_rows = ceil_div(context_size, block_m)
    width_t, width_c = engine_output_widths(NV, NS, block_m, block_n)
    out = [torch.zeros(B, H, n_rows, dtype=torch.int32), torch.zeros(B, H, n_rows, width_t, dtype=torch.int32),
           torch.zeros(B, H, n_rows, dtype=torch.int32), torch.zeros(B, H, n_rows, width_c, dtype=torch.int32)]
    verticals, slashes = vertical.tolist(), slash.tolist()
    nv, ns = v_counts.tolist(), s_counts.tolist()
    for b in range(B):
        for h in range(H):
            for m in range(min(ceil_div(q_lens[b], block_m), n_rows)):
                tiles, columns = engine_convert_walk(q_lens[b], kv_lens[b], m, verticals[b][h][:nv[h]],
                                                     slashes[b][h][:ns[h]], block_m, block_n, causal)
                tiles, columns = tiles[:width_t], columns[:width_c]
                out[0][b, h, m], out[2][b, h, m] = len(tiles), len(columns)
                out[1][b, h, m, :len(tiles)] = torch.tensor(tiles, dtype=torch.int32)
                out[3][b, h, m, :len(columns)] = torch.tensor(columns, dtype=torch.int32)
    return tuple(t.to(vertical.device) for t in out)


# ---------------------------------------------------------------------------------------------------- reference
def engine_convert_walk(q_len: int, kv_len: int, row: int, vertical: list[int], slash: list[int], block_m: int,
                        block_n: int, causal: bool) -> tuple[list[int], list[int]]:
    """(tile offsets, columns) of query block ``row`` by walking the sorted ``vertical`` / ``slash`` lists one entry
    at a time, the way the engines' kernel does (a readable reference for `engine_convert`; plain Python)."""
    M, N = block_m, block_n
    E = (kv_len - q_len if causal else kv_len) + (row + 1) * M
    outside = E if causal else kv_len                  # where the group of a block without usable slashes sits
    tiles: list[int] = []
    columns: list[int] = []

    def save(a: int, e: int) -> None:
        tiles.extend(range(a, min(e, kv_len), N))

    # the first usable slash: skip those whose chunk lies entirely before key 0
    j = 0
    while j < len(slash) - 1 and slash[j] >= E:
        j += 1
    groups_from = None
    if slash and slash[j] <= E:
        end = max(E - slash[j], M)
        groups_from = [end - M, end]
    group = groups_from or [outside, outside + N]
    j += 1
    vi = 0
    while True:
        # verticals before the current group's end are decided now: inside it they are covered, before it a column
        while vi < len(vertical) and vertical[vi] < group[1]:
            if vertical[vi] < group[0]:
                columns.append(vertical[vi])
            vi += 1
        more = groups_from is not None and j < len(slash) and (causal or slash[j] >= row * M)
        if more:
            x = max(E - slash[j], M)
            j += 1
            if x > group[1] + M:
                save(*group)
                group = [x - M, x]
            elif x > group[1]:
                group[1] += M
            continue
        save(*group)
        if not causal:               # without causal the remaining verticals inside the keys are columns
            columns.extend(v for v in vertical[vi:] if v < kv_len)
        return tiles, columns
