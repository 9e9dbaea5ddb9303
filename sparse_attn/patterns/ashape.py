"""A-shape (StreamingLLM-style): the first ``sink`` keys plus a ``local`` window before each query."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import block_row_positions
from .base import Pattern, layout_from_ranges, per_head, tile_bound


@dataclass(frozen=True)
class AShape(Pattern):
    """Keys ``[0, sink)`` and ``[pos - local + 1, pos]`` for a query at ``pos``, widened to whole query blocks
    (every row of a block sees the block's union).  Static: reads no data."""

    sink: int = 128
    local: int = 3968

    @classmethod
    def build(cls, patterns, heads, q, k, *, causal, scale, block_m, block_n):
        B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
        first, last = block_row_positions(Lq, Lk, block_m, q.device)            # [nQb]
        sink = per_head(patterns, "sink", q.device)[:, None]                     # [Hs, 1]
        local = per_head(patterns, "local", q.device)[:, None]
        starts = torch.stack([torch.zeros_like(first).expand_as(sink * first),
                              (first - local + 1).clamp(min=0)], -1)              # [Hs, nQb, 2]
        ends = torch.stack([sink.clamp(max=Lk).expand_as(sink * first),
                            (last + 1).clamp(max=Lk).expand_as(sink * first)], -1)
        ends[..., 1] = torch.where(local > 0, ends[..., 1], 0)
        n_heads = heads.shape[0]
        starts = starts.expand(B, n_heads, *starts.shape[1:])
        ends = ends.expand(B, n_heads, *ends.shape[1:])
        return layout_from_ranges(starts, ends, None, None, q_len=Lq, k_len=Lk, block_m=block_m, block_n=block_n,
                                  max_tiles=tile_bound(Lk, block_n) + 1)
