"""Exact maximum-inner-product search over every offloaded key (the baseline every index is measured against)."""
from __future__ import annotations

import torch


def exact_topk(q: torch.Tensor, keys: torch.Tensor, top_k: int, chunk: int = 1 << 18):
    """``q [S, m, D]``, ``keys [S, N, D]`` -> ``(scores [S, m, k'], ids [S, m, k'])`` with ``k' = min(top_k, N)``,
    the exact top inner products per query (fp32), scanning ``chunk`` keys at a time so memory stays
    O(m x chunk)."""
    S, m, _ = q.shape
    N = keys.shape[1]
    k = min(top_k, N)
    best_s = torch.full((S, m, 0), float("-inf"))
    best_i = torch.zeros((S, m, 0), dtype=torch.int64)
    qf = q.float()
    for start in range(0, N, chunk):
        block = keys[:, start:start + chunk].float()
        s = torch.bmm(qf, block.transpose(1, 2))
        cand_s = torch.cat([best_s, s], -1)
        cand_i = torch.cat([best_i, torch.arange(start, start + block.shape[1]).expand(S, m, -1)], -1)
        best_s, pick = cand_s.topk(min(k, cand_s.shape[-1]), dim=-1)
        best_i = cand_i.gather(-1, pick)
    return best_s, best_i


class ExactIndex:
    """Scores every key: recall 1 by construction; reads the RAM tier's keys directly (no copy)."""

    name = "exact"

    def __init__(self):
        self.source = None

    def attach(self, ram_tier) -> None:
        """Search ``ram_tier``'s keys ``[S, N, D]``; called once by the cache."""
        self.source = ram_tier

    def observe_queries(self, q: torch.Tensor) -> None:  # the exact index needs no training queries
        pass

    def add(self, keys: torch.Tensor) -> None:  # keys are already in the attached RAM tier
        pass

    def search(self, q: torch.Tensor, top_k: int):
        """``q [S, m, D]`` -> ``(ids [S, m, k], scanned [S, m], read [S, m])``; ids index the offloaded tokens;
        every key is scored and read in full."""
        keys = self.source.view()
        _, ids = exact_topk(q, keys, top_k)
        every = torch.full(q.shape[:2], keys.shape[1], dtype=torch.int64)
        return ids, every, every.clone()

    def nbytes(self) -> int:
        return 0
