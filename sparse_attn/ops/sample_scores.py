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
