"""Dense: every key (up to the causal limit), as aligned tiles."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..estimators.tiles import block_row_positions
from .base import Pattern, layout_from_ranges, tile_bound


@dataclass(frozen=True)
class Dense(Pattern):
    """All keys.  `sparse_prefill` runs a whole-Dense call with the dense kernel; in a per-head mix it becomes
    aligned tiles up to each block's last visible key."""

    @classmethod
    def build(cls, patterns, heads, q, k, *, causal, scale, block_m, block_n):
        B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
        _, last = block_row_positions(Lq, Lk, block_m, q.device)
        end = (last + 1) if causal else torch.full_like(last, Lk)
        ends = end[None, None, :, None].expand(B, heads.shape[0], -1, 1)
        return layout_from_ranges(torch.zeros_like(ends), ends, None, None, q_len=Lq, k_len=Lk, block_m=block_m,
                                  block_n=block_n, max_tiles=tile_bound(Lk, block_n))
