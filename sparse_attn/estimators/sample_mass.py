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


def antidiagonal_block_mass(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, scale: float,
                            q_blocks: slice, stride: int, causal: bool = True) -> torch.Tensor:
    """Estimated attention mass of every (query block, key block) for the query blocks ``q_blocks``:
    ``[B, Hq, n_q_blocks_in_slice, nKb]`` (fp32, each query block's row sums to 1 over the blocks it may see).

    XAttention's antidiagonal scoring: a ``stride x stride`` cell of the score matrix is summarised by the sum of its
    antidiagonal, which meets every row and every column of the cell once (so a vertical, a diagonal or a dense
    cell all leave a trace, unlike a mean of pooled vectors, which cancels).  The sums come from one matmul of
    reshaped inputs: ``q'[i] = concat_s q[i S + S - 1 - s]`` and ``k'[j] = concat_s k[j S + s]``, cost
    ``Lq x Lk x D / S``.  A softmax over the (mean) antidiagonal logits of each strided row, summed per block,
    gives the mass.  ``stride`` must divide ``block_m`` and ``block_n``.  Causal: a key cell counts for a query
    cell when it starts at or before the cell's last row (cells are coarse; the kernel masks exactly)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    S, g = stride, Hq // Hkv
    n_qb_all, n_kb = -(-Lq // block_m), -(-Lk // block_n)
    qb0, qb1, _ = q_blocks.indices(n_qb_all)
    r0, r1 = qb0 * block_m, min(qb1 * block_m, Lq)
    n_rows = (qb1 - qb0) * block_m
    shift = Lk - Lq
    # Keys a causal chunk can see end at its last row's position: cut the matmul there (whole key blocks).
    k_blocks = min(n_kb, -(-(shift + r1) // block_n)) if causal else n_kb
    k_end = k_blocks * block_n
    qc = torch.nn.functional.pad(q[:, :, r0:r1].float(), (0, 0, 0, n_rows - (r1 - r0)))
    kc = torch.nn.functional.pad(k[:, :, :min(k_end, Lk)].float(), (0, 0, 0, k_end - min(k_end, Lk)))
    q_anti = qc.reshape(B, Hkv, g, n_rows // S, S, D).flip(4).reshape(B, Hkv, g, n_rows // S, S * D)
    k_anti = kc.reshape(B, Hkv, k_end // S, S * D)
    logits = torch.einsum("bhgid,bhjd->bhgij", q_anti, k_anti).reshape(B, Hq, n_rows // S, k_end // S)
    logits.mul_(scale / S)
    cell_key = torch.arange(k_end // S, device=q.device) * S                          # first key of each key cell
    cell_row = torch.arange(n_rows // S, device=q.device) * S + r0                    # first query row of each cell
    hidden = (cell_key >= Lk)[None, :].expand(cell_row.shape[0], -1)
    if causal:
        last_pos = (cell_row + S - 1).clamp(max=Lq - 1) + shift
        hidden = hidden | (cell_key[None, :] > last_pos[:, None])
    logits.masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num_(0.0)
    valid_row = (cell_row < Lq).float()                                               # padded cells weigh nothing
    probs.mul_(valid_row[:, None])
    per_block = probs.reshape(B, Hq, qb1 - qb0, block_m // S, k_blocks, block_n // S).sum((3, 5))
    rows_in_block = valid_row.reshape(qb1 - qb0, block_m // S).sum(-1).clamp(min=1)
    per_block = per_block / rows_in_block[:, None]
    return torch.nn.functional.pad(per_block, (0, n_kb - k_blocks))
