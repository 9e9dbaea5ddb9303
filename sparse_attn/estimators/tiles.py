"""Index building shared by the estimators: key ranges -> merged tiles, columns -> the ones outside the tiles.

All functions work on whole [..., n] batches (every batch row, head and query block at once) without host sync."""
from __future__ import annotations

import torch

from ..layout import ceil_div, kept_first

_BIG = torch.iinfo(torch.int64).max // 4


def ranges_to_tiles(starts: torch.Tensor, ends: torch.Tensor, block_n: int, max_tiles: int):
    """Cover half-open key ranges ``[starts, ends)`` ([..., R] int64; empty ranges ignored) with tiles of width
    ``block_n``.  Ranges closer than ``block_n`` are merged first, so the tiles of one merged group (the last may
    reach past the group's end) never overlap the next group: a key is never listed twice.

    Returns ``count [...]`` (int32) and ``offsets [..., max_tiles]`` (int32, ascending, padding 0).  ``max_tiles``
    must bound the true count (e.g. ``ceil(k_len / block_n) + 1``); extra tiles would be dropped."""
    lead = starts.shape[:-1]
    R = starts.shape[-1]
    if R == 0 or max_tiles == 0:
        return (torch.zeros(lead, dtype=torch.int32, device=starts.device),
                torch.zeros(*lead, max_tiles, dtype=torch.int32, device=starts.device))
    valid = ends > starts
    s = torch.where(valid, starts, _BIG)
    order = s.argsort(-1)
    s = s.gather(-1, order)
    e = torch.where(valid, ends, _BIG).gather(-1, order)
    valid = s < _BIG
    run_end = e.cummax(-1).values
    new_group = torch.ones_like(valid)
    new_group[..., 1:] = s[..., 1:] >= run_end[..., :-1] + block_n
    group = (new_group & valid).cumsum(-1) - 1                       # [..., R], -1 before the first group
    slot = torch.where(valid, group, R)                             # padding goes to slot R
    g_start = torch.full(lead + (R + 1,), _BIG, dtype=s.dtype, device=s.device)
    g_start.scatter_reduce_(-1, slot, s, reduce="amin")
    g_end = torch.zeros(lead + (R + 1,), dtype=s.dtype, device=s.device)
    g_end.scatter_reduce_(-1, slot, torch.where(valid, e, 0), reduce="amax")
    g_start, g_end = g_start[..., :R], g_end[..., :R]
    n_tiles = torch.where(g_start < _BIG, (g_end - g_start + block_n - 1) // block_n, 0)
    cum = n_tiles.cumsum(-1)
    total = cum[..., -1]
    p = torch.arange(max_tiles, device=s.device).expand(*lead, max_tiles).contiguous()
    g = torch.searchsorted(cum.contiguous(), p, right=True).clamp(max=R - 1)
    first_tile = cum.gather(-1, g) - n_tiles.gather(-1, g)
    offsets = g_start.gather(-1, g) + block_n * (p - first_tile)
    used = p < total[..., None]
    count = total.clamp(max=max_tiles).to(torch.int32)
    return count, torch.where(used, offsets, 0).to(torch.int32)


def compact(values: torch.Tensor, keep: torch.Tensor, width: int):
    """Move the kept entries of ``values [..., n]`` to the front (order kept) and cut to ``width``: returns
    ``count [...]`` (int32) and ``values [..., width]`` (int32, padding 0)."""
    order = kept_first(keep, width)
    kept = keep.gather(-1, order)
    count = keep.sum(-1).clamp(max=width).to(torch.int32)
    return count, torch.where(kept, values.gather(-1, order), 0).to(torch.int32)


