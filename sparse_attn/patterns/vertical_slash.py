"""Vertical-slash (MInference-style): important key columns plus important diagonals, per head, chosen from the
attention of the last ``last_q`` queries."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops.index_build import block_row_positions
from ..ops.scores import sample_masses
from .base import Pattern, layout_from_ranges, per_head, tile_bound


@dataclass(frozen=True)
class VerticalSlash(Pattern):
    """Columns (verticals) and diagonals (slashes) with the most attention mass in the last ``last_q`` queries.

    * ``vertical`` / ``slash``: budgets (numbers of key columns / diagonals).  With ``gamma`` they are the maximum
      and ``min_vertical`` / ``min_slash`` the minimum; in between, the smallest set whose estimated attention mass
      reaches ``gamma`` (FlexPrefill's cumulative budget), taking the cheapest mass first.
    * the first ``sink`` columns and the ``local`` nearest diagonals are always kept.
    * diagonals are chosen in groups of ``block_n`` neighbours (so ``slash`` is rounded up to a multiple of it): a
      rectangular tile computes a band of 64 diagonals anyway, so a lone diagonal would cost as much as its group.
    """

    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    gamma: float | None = None
    min_vertical: int = 0
    min_slash: int = 0
    sink: int = 64
    local: int = 64

    def invalid_reasons(self):
        reasons = super().invalid_reasons()
        if self.last_q < 1:
            reasons.append(f"last_q must be >= 1, got {self.last_q}")
        if self.gamma is not None and not 0 < self.gamma <= 1:
            reasons.append(f"gamma must lie in (0, 1], got {self.gamma}")
        if self.sink > self.vertical:
            reasons.append(f"sink ({self.sink}) must be <= vertical ({self.vertical})")
        if self.local > self.slash:
            reasons.append(f"local ({self.local}) must be <= slash ({self.slash})")
        if self.min_vertical > self.vertical or self.min_slash > self.slash:
            reasons.append("min_vertical / min_slash must not exceed vertical / slash")
        return reasons

    def group_key(self):
        return (type(self), self.last_q)

    @classmethod
    def build(cls, patterns, heads, q, k, *, causal, scale, block_m, block_n):
        B, Lq, Lk, dev = q.shape[0], q.shape[2], k.shape[2], q.device
        col, diag, n_rows = sample_masses(q, k, patterns[0].last_q, scale, causal)
        col, diag = col.index_select(1, heads), diag.index_select(1, heads)          # [B, Hs, Lk]
        n_buckets = -(-Lk // block_n)
        bucket = torch.nn.functional.pad(diag, (0, n_buckets * block_n - Lk)).reshape(*diag.shape[:2], -1,
                                                                                      block_n).sum(-1)
        keys, dists = torch.arange(Lk, device=dev), torch.arange(n_buckets, device=dev) * block_n
        force_v = keys < per_head(patterns, "sink", dev)[:, None]                     # [Hs, Lk]
        force_s = dists < per_head(patterns, "local", dev)[:, None]                   # [Hs, nB]
        max_v = per_head(patterns, "vertical", dev).clamp(max=Lk)
        max_s = (per_head(patterns, "slash", dev) + block_n - 1) // block_n
        min_v = per_head(patterns, "min_vertical", dev)
        min_s = (per_head(patterns, "min_slash", dev) + block_n - 1) // block_n
        chosen_v = chosen_s = None
        gammas = [p.gamma for p in patterns]
        if any(g is not None for g in gammas):
            gamma = torch.tensor([2.0 if g is None else g for g in gammas], device=dev)   # 2.0: fixed budget
            chosen_v, chosen_s = _cheapest_mass(col, bucket, block_n, gamma[:, None] * n_rows, force_v, force_s)
        verticals, v_ok = _top_within(col, force_v, max_v, min_v, chosen_v)
        buckets, s_ok = _top_within(bucket, force_s, max_s.clamp(max=n_buckets), min_s, chosen_s)

        first, last = block_row_positions(Lq, Lk, block_m, dev)                       # [nQb]
        d0 = (buckets * block_n)[:, :, None, :]                                        # [B, Hs, 1, nb]
        starts = (first[:, None] - d0 - block_n + 1).clamp(min=0)
        ends = (last[:, None] - d0 + 1).clamp(max=Lk)
        ends = torch.where(s_ok[:, :, None, :], ends, starts)                          # unused bucket: empty
        big = torch.iinfo(torch.int64).max
        verticals = torch.where(v_ok, verticals, big).sort(-1).values                  # ascending, padding last
        cols = verticals[:, :, None, :].expand(-1, -1, first.shape[0], -1)
        keep = cols < big
        if causal:
            keep = keep & (cols <= last[:, None])
        cols = torch.where(keep, cols, 0)
        return layout_from_ranges(starts, ends, cols, keep, q_len=Lq, k_len=Lk, block_m=block_m, block_n=block_n,
                                  max_tiles=min(2 * buckets.shape[-1], tile_bound(Lk, block_n)))


def _top_within(score, forced, max_budget, min_budget, chosen):
    """Top ``max(max_budget)`` indices of ``score [B, Hs, N]`` (forced entries first) and which are kept:
    rank < the head's max budget, and (forced, rank < min budget, or chosen by the mass budget)."""
    width = max(int(max_budget.max()) if max_budget.numel() else 0, 1)
    width = min(width, score.shape[-1])
    ranked = torch.where(forced, math.inf, score).topk(width, dim=-1)
    rank = torch.arange(width, device=score.device)
    keep = (rank < max_budget[:, None]).expand_as(ranked.indices)
    if chosen is not None:
        picked = chosen.gather(-1, ranked.indices) | forced.expand_as(score).gather(-1, ranked.indices)
        keep = keep & (picked | (rank < min_budget[:, None]))
    return ranked.indices, keep


def _cheapest_mass(col, bucket, block_n, target, force_v, force_s):
    """Smallest set of columns (cost 1 key per row) and diagonal groups (cost block_n) whose mass reaches
    ``target [Hs, 1]``, taking the most mass per key first; forced entries come first.  Bool masks over columns
    [B, Hs, Lk] and groups [B, Hs, nB]."""
    mass = torch.cat([col, bucket], -1)
    value = torch.cat([torch.where(force_v, math.inf, col), torch.where(force_s, math.inf, bucket / block_n)], -1)
    order = value.argsort(-1, descending=True)
    sorted_mass = mass.gather(-1, order)
    before = sorted_mass.cumsum(-1) - sorted_mass
    keep_sorted = before < target
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep[..., :col.shape[-1]], keep[..., col.shape[-1]:]
