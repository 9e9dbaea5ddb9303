"""Block-sparse: per query block, the key blocks with the highest pooled attention scores."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import SparseLayout, block_row_positions, ceil_div
from ..backends.host_copy import host_tensor
from ..estimators.tiles import compact
from ..estimators.sample_mass import antidiagonal_block_mass, pooled_block_logits
from .base import Pattern, compacts_slots

#: Causal antidiagonal scoring runs in at least this many chunks of query blocks, each scoring only the keys its
#: last row sees: 16 chunks score ~53% of the full matrix (one chunk: all of it; at 32K, 3 heads, one thread: 690 ms
#: in one chunk, 476 ms in 16, the same layout).
CAUSAL_CHUNKS = 16

SCORINGS = ("auto", "antidiagonal", "mean")


@dataclass(frozen=True)
class BlockSparse(Pattern):
    """Key blocks ranked by their estimated attention mass, block-causal; the sink block and the diagonal block(s)
    are always kept, on top of the budget.  ``top_k`` blocks per query block (forced ones included when they fit),
    or with ``gamma`` the fewest blocks whose estimated mass reaches gamma (``top_k`` then caps the rest).
    ``BlockSparse()`` means ``top_k=100``.

    ``scoring``: "antidiagonal" (XAttention: antidiagonal sums of ``stride x stride`` cells, `ops.scores.
    antidiagonal_block_mass`; tells blocks apart, costs 1/stride of the score matmul), "mean" (mean-pooled query
    block . key block: cheap, but averaging cancels structure, so gamma budgets come out far too dense), or "auto"
    (antidiagonal with gamma, mean for a plain top_k).  ``stride`` is cut to divide both block sizes."""

    top_k: int | None = None
    gamma: float | None = None
    scoring: str = "auto"
    stride: int = 16

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
        if self.scoring not in SCORINGS:
            reasons.append(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            reasons.append(f"stride must be a positive int, got {self.stride!r}")
        return reasons

    def resolved_scoring(self) -> str:
        if self.scoring != "auto":
            return self.scoring
        return "antidiagonal" if self.gamma is not None else "mean"

    def group_key(self):
        return (type(self), self.resolved_scoring(), self.stride)

    @classmethod
    def build(cls, patterns, heads, q, k, *, causal, scale, block_m, block_n, max_bytes=64 << 20):
        B, Hq, Lq, _ = q.shape
        Lk, dev = k.shape[2], q.device
        n_kb = ceil_div(Lk, block_n)
        block_probs = _block_probs(patterns[0], heads, q, k, causal=causal, scale=scale, block_m=block_m,
                                   block_n=block_n)
        first, last = block_row_positions(Lq, Lk, block_m, dev)
        top_k = host_tensor([n_kb if p.top_k is None else p.top_k for p in patterns], device=dev)     # no sync
        gamma = host_tensor([2.0 if p.gamma is None else p.gamma for p in patterns], device=dev)
        kb = torch.arange(n_kb, device=dev)
        # Scores held per query block and head: one per key block (mean), or (block_m / S) x (Lk / S) (antidiagonal).
        stride = math.gcd(patterns[0].stride, block_m, block_n)
        per_block = n_kb if patterns[0].resolved_scoring() == "mean" else (block_m // stride) * (n_kb * block_n // stride)
        rows = max(1, max_bytes // max(B * heads.shape[0] * per_block * 4, 1))
        if causal and per_block != n_kb:   # antidiagonal scores stop at a chunk's last row's keys
            rows = min(rows, ceil_div(first.shape[0], CAUSAL_CHUNKS))
        # Most blocks a query block keeps (host-known): the top_k budget, or the forced ones (sink block and the
        # diagonal blocks, at most (block_m - 1) // block_n + 2 of them) when more; gamma alone: every block.
        forced_bound = (block_m - 1) // block_n + 3
        static_width = min(n_kb, max(max(n_kb if p.top_k is None else p.top_k for p in patterns), forced_bound))
        counts, offsets = [], []
        for r0 in range(0, first.shape[0], rows):          # chunks of query blocks bound the memory
            sl = slice(r0, r0 + rows)
            allowed = (kb * block_n <= last[sl, None]) if causal else torch.ones_like(kb, dtype=torch.bool)
            forced = (kb == 0) | ((kb >= first[sl, None] // block_n) & (kb <= last[sl, None] // block_n))
            forced = forced & ((kb * block_n < Lk))
            probs = block_probs(sl, allowed)                                          # [B, Hs, rows, nKb]
            score = probs.masked_fill(~allowed, -math.inf)
            ranked = torch.where(forced, math.inf, score).sort(-1, descending=True)
            rank = torch.arange(n_kb, device=dev)
            is_forced = ranked.values == math.inf
            keep = ((rank < top_k[:, None, None]) & (ranked.values > -math.inf)) | is_forced
            if any(p.gamma is not None for p in patterns):
                sorted_probs = probs.gather(-1, ranked.indices)
                before = sorted_probs.cumsum(-1) - sorted_probs
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


def _block_probs(pattern: BlockSparse, heads, q, k, *, causal, scale, block_m, block_n):
    """``fn(q_block_slice, allowed [rows, nKb]) -> [B, Hs, rows, nKb]``: the estimated mass of each key block for
    the query heads ``heads`` (zero where not ``allowed``), by the group's scoring."""
    Hq, Hkv = q.shape[1], k.shape[1]
    if pattern.resolved_scoring() == "mean":
        def mean_pooled(sl, allowed):
            logits = pooled_block_logits(q, k, block_m, block_n, scale, sl).index_select(1, heads)
            return torch.softmax(logits.masked_fill(~allowed, -math.inf), -1)
        return mean_pooled
    stride = math.gcd(pattern.stride, block_m, block_n)
    if heads.shape[0] < Hq:            # score only these heads: their query rows and their KV heads' keys
        q, k = q.index_select(1, heads), k.index_select(1, heads // (Hq // Hkv))

    def antidiagonal(sl, allowed):
        return antidiagonal_block_mass(q, k, block_m, block_n, scale, sl, stride, causal) * allowed
    return antidiagonal
