"""Dense: every key (up to the causal limit), as aligned tiles."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import SparseLayout, block_row_positions
from .base import Pattern, tile_bound


@dataclass(frozen=True)
class Dense(Pattern):
    """All keys.  `sparse_prefill` runs a whole-Dense call with the dense kernel; in a per-head mix it becomes
    aligned tiles up to each block's last visible key."""

    @classmethod
    def build(cls, patterns, heads, q, k, *, causal, scale, block_m, block_n):
        # Written out directly (aligned tiles from 0 to each block's end): the general range merge cost more than
        # the rest of an all-dense estimate at 32K.
        B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
        _, last = block_row_positions(Lq, Lk, block_m, q.device)
        end = (last + 1) if causal else torch.full_like(last, Lk)
        width = tile_bound(Lk, block_n)
        count = ((end + block_n - 1) // block_n).to(torch.int32)                          # [nQb]
        starts = torch.arange(width, device=q.device, dtype=torch.int32) * block_n
        offsets = torch.where(torch.arange(width, device=q.device) < count[:, None], starts, 0)   # [nQb, width]
        shape = (B, heads.shape[0])
        empty = torch.zeros(*shape, count.shape[0], 0, dtype=torch.int32, device=q.device)
        return SparseLayout(count.expand(*shape, -1).contiguous(), offsets.expand(*shape, -1, -1).contiguous(),
                            torch.zeros(*shape, count.shape[0], dtype=torch.int32, device=q.device), empty,
                            q_len=Lq, k_len=Lk, block_m=block_m, block_n=block_n)
