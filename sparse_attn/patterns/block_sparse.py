"""Block-sparse: per query block, the key blocks with the highest pooled attention scores."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import SparseLayout
from ..backends.host_copy import host_tensor
from ..estimators.tiles import block_row_positions, compact
from ..estimators.sample_mass import pooled_block_logits
from .base import Pattern, compacts_slots


@dataclass(frozen=True)
class BlockSparse(Pattern):
    """Key blocks ranked by mean-pooled query-block . key-block scores, block-causal; the sink block and the
    diagonal block(s) are always kept, on top of the budget.  ``top_k`` blocks per query block (forced ones
    included when they fit), or with ``gamma`` the fewest blocks whose estimated mass reaches gamma (``top_k`` then
    caps the rest).  ``BlockSparse()`` means ``top_k=100``."""

    top_k: int | None = None
    gamma: float | None = None

    def __post_init__(self):
        if self.top_k is None and self.gamma is None:
            object.__setattr__(self, "top_k", 100)
        super().__post_init__()

    def invalid_reasons(self):
        reasons = super().invalid_reasons()
        if self.gamma is not None and not 0 < self.gamma <= 1:
            reasons.append(f"gamma must lie in (0, 1], got {self.gamma}")
        if self.top_k is not None and self.top_k < 1:
            reasons.append(f"top_k must be >= 1, got {self.top_k}")
        return reasons

    @classmethod
    def build(cls, patterns, heads, q, k, *, causal, scale, block_m, block_n, max_bytes=64 << 20):
        B, Hq, Lq, _ = q.shape
        Lk, dev = k.shape[2], q.device
        n_kb = -(-Lk // block_n)
        first, last = block_row_positions(Lq, Lk, block_m, dev)
        top_k = host_tensor([n_kb if p.top_k is None else p.top_k for p in patterns], device=dev)     # no sync
        gamma = host_tensor([2.0 if p.gamma is None else p.gamma for p in patterns], device=dev)
        kb = torch.arange(n_kb, device=dev)
        rows = max(1, max_bytes // max(B * Hq * n_kb * 4, 1))
        # Most blocks a query block keeps (host-known): the top_k budget, or the forced ones (sink block and the
        # diagonal blocks, at most (block_m - 1) // block_n + 2 of them) when more; gamma alone: every block.
        forced_bound = (block_m - 1) // block_n + 3
        static_width = min(n_kb, max(max(n_kb if p.top_k is None else p.top_k for p in patterns), forced_bound))
        counts, offsets = [], []
        for r0 in range(0, first.shape[0], rows):          # chunks of query blocks bound the memory
            sl = slice(r0, r0 + rows)
            logits = pooled_block_logits(q, k, block_m, block_n, scale, sl).index_select(1, heads)
            allowed = (kb * block_n <= last[sl, None]) if causal else torch.ones_like(kb, dtype=torch.bool)
            forced = (kb == 0) | ((kb >= first[sl, None] // block_n) & (kb <= last[sl, None] // block_n))
            forced = forced & ((kb * block_n < Lk))
            logits = logits.masked_fill(~allowed, -math.inf)
            ranked = torch.where(forced, math.inf, logits).sort(-1, descending=True)
            rank = torch.arange(n_kb, device=dev)
            is_forced = ranked.values == math.inf
            keep = ((rank < top_k[:, None, None]) & (ranked.values > -math.inf)) | is_forced
            if any(p.gamma is not None for p in patterns):
                probs = torch.softmax(logits, -1).gather(-1, ranked.indices)
                before = probs.cumsum(-1) - probs
                keep = keep & ((before < gamma[:, None, None]) | is_forced)
            chosen = torch.zeros_like(keep).scatter_(-1, ranked.indices, keep)        # by key block, ascending
            # Cut to the fullest row (a sync, free on the CPU); on a GPU keep the static width, no stream stall.
            width = max(int(chosen.sum(-1).max()), 1) if compacts_slots(dev) else static_width
            c, o = compact(kb.expand_as(chosen) * block_n, chosen, width)
            counts.append(c)
            offsets.append(o)
        width = max(o.shape[-1] for o in offsets)
        offsets = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[-1])) for o in offsets], 2)
        count = torch.cat(counts, 2)
        empty = torch.zeros(*count.shape, 0, dtype=torch.int32, device=dev)
        return SparseLayout(count, offsets, torch.zeros_like(count), empty, q_len=Lq, k_len=Lk, block_m=block_m,
                            block_n=block_n)
