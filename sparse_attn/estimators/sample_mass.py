"""Estimator scores: attention of a query sample against all keys, reduced to column / diagonal / block mass.

Memory is O(last_q x Lk) per head chunk; every head is handled at once (GQA without repeating KV)."""
from __future__ import annotations

import torch


def last_query_probs(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float, causal: bool = True):
    """Softmax (fp32) of the last ``last_q`` queries of ``q [B, Hq, Lq, D]`` against ``k [B, Hkv, Lk, D]``,
    causal inside the sample: ``[B, Hq, n, Lk]`` with ``n = min(last_q, Lq)``, and the key positions ``[n]`` of
    those queries."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    n = min(last_q, Lq)
    sample = (q[:, :, Lq - n:].float() * scale).reshape(B, Hkv, Hq // Hkv, n, D)     # scale n x D, not n x Lk
    logits = torch.einsum("bhgnd,bhkd->bhgnk", sample, k.float()).reshape(B, Hq, n, Lk)
    pos = torch.arange(Lq - n, Lq, device=q.device) + (Lk - Lq)
    if causal:             # only the last n keys can lie after a sample row
        tail = torch.arange(Lk - n, Lk, device=q.device)
        logits[..., Lk - n:].masked_fill_(tail > pos[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1), pos


def column_mass(probs: torch.Tensor) -> torch.Tensor:
    """Attention mass per key column, summed over the sample rows: [B, H, Lk]."""
    return probs.sum(-2)


def diagonal_mass(probs: torch.Tensor, pos: torch.Tensor, n_dist: int | None = None) -> torch.Tensor:
    """Attention mass per distance ``d = query position - key`` (d >= 0), summed over sample rows, for
    ``probs [B, H, n, K]`` over keys ``0..K-1``: [B, H, n_dist] (default n_dist = K)."""
    Lk = probs.shape[-1] if n_dist is None else n_dist
    dist = pos[:, None] - torch.arange(probs.shape[-1], device=probs.device)  # [n, K]
    index = torch.where((dist >= 0) & (dist < Lk), dist, Lk).expand_as(probs)
    out = torch.zeros(*probs.shape[:2], Lk + 1, dtype=probs.dtype, device=probs.device)
    out.scatter_add_(-1, index.reshape(*probs.shape[:2], -1), probs.reshape(*probs.shape[:2], -1))
    return out[..., :Lk]


def pooled_block_logits(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, scale: float,
                        q_blocks: slice):
    """Mean-pooled query block . mean-pooled key block logits for the query blocks ``q_blocks``:
    ``[B, Hq, n_q_blocks_in_slice, nKb]`` (fp32)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    q_pool = _mean_pool(q, block_m)[:, :, q_blocks]
    k_pool = _mean_pool(k, block_n)
    g = Hq // Hkv
    logits = torch.einsum("bhgnd,bhkd->bhgnk", q_pool.reshape(B, Hkv, g, -1, D), k_pool)
    return logits.reshape(B, Hq, -1, k_pool.shape[2]).mul_(scale)


def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    B, H, L, D = x.shape
    n = -(-L // block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - L))
    sums = padded.reshape(B, H, n, block, D).sum(3)
    sizes = (torch.arange(n, device=x.device) * block).sub(L).neg().clamp(max=block).float()
    return sums / sizes[:, None]
