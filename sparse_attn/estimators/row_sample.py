"""Attention of an arbitrary sample of query rows (not only the last ones) against all keys, for estimators that
look at each modality's own last queries.  Memory O(n x Lk) per head; all heads at once, GQA without repeating KV."""
from __future__ import annotations

import torch


def rows_probs(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float, causal: bool = True):
    """Softmax (fp32) of the query rows ``rows`` (long [n], ascending row indices into ``q [B, Hq, Lq, D]``)
    against ``k [B, Hkv, Lk, D]``: ``[B, Hq, n, Lk]``, and the key positions ``[n]`` of those rows (bottom-right
    alignment: row i sits at key position i + Lk - Lq).  With ``causal`` each row sees keys up to its position."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    n = rows.shape[0]
    sample = q.index_select(2, rows).float().reshape(B, Hkv, Hq // Hkv, n, D)
    logits = torch.einsum("bhgnd,bhkd->bhgnk", sample, k.float()).reshape(B, Hq, n, Lk).mul_(scale)
    pos = rows + (Lk - Lq)
    if causal:
        logits.masked_fill_(torch.arange(Lk, device=q.device) > pos[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1), pos


def consistent_column_mass(probs: torch.Tensor) -> torch.Tensor:
    """Column mass that only a real vertical earns: twice the smaller of the masses the two halves of the sample
    rows ``probs [B, H, n, K]`` put on each column, [B, H, K].  A diagonal crossing a sample of consecutive rows
    puts the mass of one row on each of its keys, so plain column mass scores those keys like columns (and a
    budget spent on them serves only the sample rows); here they score (almost) nothing."""
    half = probs.shape[-2] // 2
    if half == 0:
        return probs.sum(-2)
    return 2 * torch.minimum(probs[..., :half, :].sum(-2), probs[..., half:2 * half, :].sum(-2))


def rows_prefix_mass(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float, causal: bool = True, *,
                     heads: torch.Tensor):
    """Prefix sums of the softmax of the query rows ``rows`` (long [R]) of the query heads ``heads`` (long [Hs]):
    ``[B, Hs, R, Lk + 1]`` fp32, entry ``j`` the mass of keys ``[0, j)``, so a key range's mass is one difference
    (the readable reference of the fused CPU pass `cpu_scores.cpu_rows_prefix_mass`)."""
    probs = rows_probs(q, k, rows, scale, causal)[0]
    if heads.numel() != probs.shape[1] or not torch.equal(heads, torch.arange(probs.shape[1], device=heads.device)):
        probs = probs.index_select(1, heads)
    return torch.nn.functional.pad(probs.cumsum(-1), (1, 0))
