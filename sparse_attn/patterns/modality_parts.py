"""Compile the pieces of a modality-aware layout into one SparseLayout.

A modality pattern is a union of *parts*.  Each part applies to some query blocks (the blocks holding rows of one
modality or of one video) and lists, per batch row and head, key columns and *distance bands*: a band
``[lo, hi]`` gives a query at position ``p`` the keys ``p - hi .. p - lo`` (a group of diagonals: a vertical-slash
slash group is ``[g * block_n, g * block_n + block_n - 1]``, a grid diagonal ``[j * stride - width, j * stride +
width]``).  A part may clip its bands' keys to intervals (a video span, or the keys of one modality), each range to
the hull of the interval keys inside it.  Every part is turned into key ranges per query block at once (no loop
over heads or blocks), then all ranges are merged into tiles and repeated columns dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import SparseLayout, block_row_positions
from .base import layout_from_ranges, tile_bound


@dataclass
class Part:
    """``blocks`` bool [nQb]: the query blocks this part applies to.  ``columns`` / ``column_ok`` long / bool
    [B, H, V] (or None); ``band_lo``, ``band_hi`` long [B, H, R] inclusive distances, ``band_ok`` bool [B, H, R]
    (or None); ``clip``: sorted disjoint ``[start, end)`` key intervals the bands are cut to (None: no cut)."""

    blocks: torch.Tensor
    columns: torch.Tensor | None = None
    column_ok: torch.Tensor | None = None
    band_lo: torch.Tensor | None = None
    band_hi: torch.Tensor | None = None
    band_ok: torch.Tensor | None = None
    clip: list | None = None
    tail_columns: bool = False


def _tail_as_columns(s, e, block_n):
    """Split ranges ``[s, e)`` [..., R] into a head range of at most ``block_n`` keys (one tile) and the rest as
    single columns: a band a little wider than a tile costs its width, not two tiles.  Returns (s, head end,
    columns [..., R * W], kept)."""
    head_end = torch.minimum(e, s + block_n)
    extra = max(int((e - s).max()) - block_n, 0) if e.numel() else 0
    cols = head_end[..., None] + torch.arange(extra, device=s.device)              # [..., R, W]
    keep = cols < e[..., None]
    return s, head_end, cols.flatten(-2), keep.flatten(-2)


def clip_to_intervals(starts: torch.Tensor, ends: torch.Tensor, intervals: list):
    """Cut each key range ``[starts, ends)`` (long, any shape) to the hull of its keys inside ``intervals`` (sorted
    disjoint ``[a, b)`` pairs); a range with no such key becomes empty (end = start)."""
    if not intervals:
        return starts, starts.clone()
    a = torch.tensor([i[0] for i in intervals], dtype=torch.long, device=starts.device)
    b = torch.tensor([i[1] for i in intervals], dtype=torch.long, device=starts.device)
    n = a.shape[0]
    first = torch.searchsorted(b, starts.contiguous(), right=True)          # first interval ending after start
    new_start = torch.maximum(starts, a[first.clamp(max=n - 1)])
    last = torch.searchsorted(a, ends.contiguous()) - 1                      # last interval starting before end
    new_end = torch.minimum(ends, b[last.clamp(min=0)])
    empty = (first >= n) | (last < 0) | (new_start >= new_end)
    return new_start, torch.where(empty, new_start, new_end)


def compile_parts(parts: list, batch: int, heads: int, *, q_len: int, k_len: int, block_m: int, block_n: int,
                  causal: bool, device) -> SparseLayout:
    """The SparseLayout ``[batch, heads, nQb]`` listing, for every query block, the union of its parts' keys."""
    first, last = block_row_positions(q_len, k_len, block_m, device)                # [nQb]
    n_qb = first.shape[0]
    starts, ends, columns, keeps = [], [], [], []
    for p in parts:
        blocks = p.blocks.to(device)[:, None]                                        # [nQb, 1]
        if p.band_lo is not None and p.band_lo.shape[-1]:
            s = (first[:, None] - p.band_hi[:, :, None, :]).clamp(min=0)             # [B, H, nQb, R]
            e = (last[:, None] - p.band_lo[:, :, None, :] + 1).clamp(max=k_len)
            if p.clip is not None:
                s, e = clip_to_intervals(s, e, p.clip)
            ok = p.band_ok[:, :, None, :] & blocks
            e = torch.where(ok, e, s)
            if p.tail_columns:
                s, e, tail, tail_ok = _tail_as_columns(s, e, block_n)
                columns.append(tail)
                keeps.append(tail_ok)
            starts.append(s)
            ends.append(e)
        if p.columns is not None and p.columns.shape[-1]:
            c = p.columns[:, :, None, :].expand(-1, -1, n_qb, -1)
            keep = p.column_ok[:, :, None, :] & blocks
            if causal:
                keep = keep & (c <= last[:, None])
            columns.append(c)
            keeps.append(keep)
    shape = (batch, heads, n_qb)
    if not starts:
        starts = ends = [torch.zeros(*shape, 0, dtype=torch.long, device=device)]
    if not columns:
        columns, keeps = [torch.zeros(*shape, 0, dtype=torch.long, device=device)], [
            torch.zeros(*shape, 0, dtype=torch.bool, device=device)]
    cols, keep = _unique_columns(torch.cat(columns, -1), torch.cat(keeps, -1))
    layout = layout_from_ranges(torch.cat(starts, -1), torch.cat(ends, -1), cols, keep, q_len=q_len, k_len=k_len,
                                block_m=block_m, block_n=block_n, max_tiles=tile_bound(k_len, block_n) + 1)
    return _trimmed(layout)


def _unique_columns(cols: torch.Tensor, keep: torch.Tensor):
    """Sorted columns with repeats (several parts naming one key) dropped."""
    big = torch.iinfo(torch.int64).max
    c = torch.where(keep, cols, big).sort(-1).values
    keep = c < big
    keep[..., 1:] &= c[..., 1:] != c[..., :-1]
    return torch.where(keep, c, 0), keep


def _trimmed(layout: SparseLayout) -> SparseLayout:
    """Cut the index tensors to the widest query block (one host sync each), as the other estimators do."""
    nb = max(int(layout.block_count.max()) if layout.block_count.numel() else 0, 1)
    nc = int(layout.column_count.max()) if layout.column_count.numel() else 0
    return SparseLayout(layout.block_count, layout.block_offset[..., :nb].contiguous(), layout.column_count,
                        layout.column_index[..., :nc].contiguous(), q_len=layout.q_len, k_len=layout.k_len,
                        block_m=layout.block_m, block_n=layout.block_n)


def concat_batch(layouts: list) -> SparseLayout:
    """Stack layouts of single batch rows (same heads, lengths and blocks) along the batch axis."""
    first = layouts[0]

    def pad_cat(name):
        parts = [getattr(l, name) for l in layouts]
        width = max(p.shape[-1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts], dim=0)

    return SparseLayout(torch.cat([l.block_count for l in layouts]), pad_cat("block_offset"),
                        torch.cat([l.column_count for l in layouts]), pad_cat("column_index"), q_len=first.q_len,
                        k_len=first.k_len, block_m=first.block_m, block_n=first.block_n)
