"""This package's own vertical/slash -> block index conversion (``convert_vertical_slash_indexes(..., clip=True)``):
exact clipping of each slash range to the block's rows, ranges merged across gaps shorter than a tile, and every
vertical the tiles miss kept as a column.  It names every key the caller's pattern names and few others; the
engines' kernel (`vertical_slash_engine`) drops some and adds others.  The CUDA kernel in ``csrc/`` computes the
same on CUDA tensors.

Positions are bottom-right: query row ``i`` of an entry sits at ``kv_len - q_len + i`` (the caller shifts the
slashes for the engines' non-causal placement)."""
from __future__ import annotations

import torch

from ..layout import block_row_positions, keys_in_tiles
from ..estimators.tiles import compact, ranges_to_tiles
from ..backends.cuda.vertical_slash_args import vertical_slash_output_sizes


def clipped_vertical_slash_indexes(q_lens: list[int], kv_lens: list[int], vertical_indexes, slash_indexes,
                                   context_size: int, block_size_M: int, block_size_N: int, causal: bool = True):
    """Per query block (``block_size_M`` rows at positions ``p0..p1``) slash ``s`` adds the key range
    ``[p0 - s, p1 - s]`` (clipped to the sequence, and with ``causal`` to ``<= p1``); the ranges are merged (also
    across gaps shorter than ``block_size_N``) and each merged range ``[a, e)`` is covered by tiles at
    ``a, a + block_size_N, ...`` (the last may reach up to ``block_size_N - 1`` keys past ``e``).  Verticals inside
    the sequence (with ``causal``, at or before ``p1``) that no tile covers become columns.  Neither index needs to
    be sorted; duplicates are harmless.

    Returns int32 ``block_count [batch, heads, nR]``, ``block_offset [batch, heads, nR, NB]``, ``column_count``,
    ``column_index [batch, heads, nR, NNZ_V]`` with ``nR = ceil(context_size / block_size_M)`` and ``NB`` from
    `vertical_slash_output_sizes` (a bound on the tile count, from the longer of ``context_size`` and the kv
    lengths).  Padding is 0."""
    batch, heads = vertical_indexes.shape[:2]
    dev = vertical_indexes.device
    bm, bn = block_size_M, block_size_N
    nnz_v, nnz_s = vertical_indexes.shape[2], slash_indexes.shape[2]
    n_rows, _ = vertical_slash_output_sizes(context_size, bm, bn, nnz_s)
    _, max_tiles = vertical_slash_output_sizes(max([context_size, *kv_lens]), bm, bn, nnz_s)   # kv may exceed it
    block_count = torch.zeros(batch, heads, n_rows, dtype=torch.int32, device=dev)
    block_offset = torch.zeros(batch, heads, n_rows, max_tiles, dtype=torch.int32, device=dev)
    column_count = torch.zeros(batch, heads, n_rows, dtype=torch.int32, device=dev)
    column_index = torch.zeros(batch, heads, n_rows, nnz_v, dtype=torch.int32, device=dev)
    for b in range(batch):                                 # entries differ in length; heads are done together
        q_len, kv_len = q_lens[b], kv_lens[b]
        if q_len == 0:
            continue
        p0, p1 = block_row_positions(q_len, kv_len, bm, device=dev)          # [nQb] first / last row position
        n_qb = min(p0.shape[0], n_rows)
        p0, p1 = p0[:n_qb], p1[:n_qb]
        limit = (p1 + 1) if causal else torch.full_like(p1, kv_len)           # keys < limit, per block
        s = slash_indexes[b].long()[:, None, :]                               # [H, 1, S]
        starts = (p0[None, :, None] - s).clamp(min=0)
        ends = torch.minimum(p1[None, :, None] - s + 1, limit[None, :, None].clamp(max=kv_len))
        if nnz_s:
            count, offsets = ranges_to_tiles(starts, ends, bn, max_tiles)   # [H, nQb], [H, nQb, max_tiles]
        else:             # ranges_to_tiles fails on zero ranges
            count = torch.zeros(heads, n_qb, dtype=torch.int32, device=dev)
            offsets = torch.zeros(heads, n_qb, max_tiles, dtype=torch.int32, device=dev)
        tiles_valid = torch.arange(max_tiles, device=dev) < count[..., None]
        vert = vertical_indexes[b].long().sort(-1).values[:, None, :].expand(heads, n_qb, nnz_v)
        keep = (vert >= 0) & (vert < limit[None, :, None])
        if nnz_v > 1:
            first = torch.ones_like(keep)
            first[..., 1:] = vert[..., 1:] != vert[..., :-1]
            keep &= first
        keep &= ~keys_in_tiles(vert, offsets.long(), tiles_valid, bn)
        c_count, c_index = compact(vert, keep, nnz_v)
        block_count[b, :, :n_qb], block_offset[b, :, :n_qb] = count, offsets
        column_count[b, :, :n_qb], column_index[b, :, :n_qb] = c_count, c_index
    return block_count, block_offset, column_count, column_index
