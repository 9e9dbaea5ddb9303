"""Estimator scores: attention of a query sample against all keys, reduced to column / diagonal / block mass.

Memory is O(last_q x Lk) per head chunk; every head is handled at once (GQA without repeating KV)."""
from __future__ import annotations

import torch
from ..errors import InvalidArgumentError
from ..layout import ceil_div


def last_query_probs(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float, causal: bool = True,
                     key_stride: int = 1):
    """Softmax (fp32) of the last ``last_q`` queries of ``q [B, Hq, Lq, D]`` against ``k [B, Hkv, Lk, D]``,
    causal inside the sample: ``[B, Hq, n, Lk]`` with ``n = min(last_q, Lq)``, and the key positions ``[n]`` of
    those queries.  ``key_stride``: against every ``key_stride``-th key only (``[B, Hq, n, ceil(Lk / stride)]``,
    normalised over those keys)."""
    logits, pos = last_query_logits(q, k, last_q, scale, causal, key_stride)
    return torch.softmax(logits, dim=-1), pos


def last_query_logits(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float, causal: bool = True,
                      key_stride: int = 1):
    """The scaled logits behind `last_query_probs` (-inf where causally hidden), and the rows' key positions."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    n = min(last_q, Lq)
    sample = (q[:, :, Lq - n:].float() * scale).reshape(B, Hkv, Hq // Hkv, n, D)     # scale n x D, not n x Lk
    keys = k[:, :, ::key_stride]
    logits = torch.einsum("bhgnd,bhkd->bhgnk", sample, keys.float()).reshape(B, Hq, n, keys.shape[2])
    pos = torch.arange(Lq - n, Lq, device=q.device) + (Lk - Lq)
    if causal:             # only the last n keys can lie after a sample row
        first = ceil_div(Lk - n, key_stride)                       # first strided key among the last n
        tail = torch.arange(first, keys.shape[2], device=q.device) * key_stride
        logits[..., first:].masked_fill_(tail > pos[:, None], float("-inf"))
    return logits, pos


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
    n = ceil_div(L, block)
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
    n_qb_all, n_kb = ceil_div(Lq, block_m), ceil_div(Lk, block_n)
    qb0, qb1, _ = q_blocks.indices(n_qb_all)
    r0, r1 = qb0 * block_m, min(qb1 * block_m, Lq)
    n_rows = (qb1 - qb0) * block_m
    shift = Lk - Lq
    # Keys a causal chunk can see end at its last row's position: cut the matmul there (whole key blocks).
    k_blocks = min(n_kb, ceil_div(shift + r1, block_n)) if causal else n_kb
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


def column_mass_by_group(probs: torch.Tensor, pos: torch.Tensor, group: int) -> torch.Tensor:
    """Column mass of the sample rows ``probs [B, H, n, K]`` (consecutive positions ``pos [n]``) split by diagonal
    group: ``[B, H, K, G]``, slot ``t`` of key ``j`` holding the rows at distance ``d = pos - j >= 0`` in group
    ``d // group == (pos[0] - j) // group + t`` (n consecutive rows span ``G = (n + group - 2) // group + 1``
    groups).  With it the mass on any set of diagonal groups is a lookup per key (`GroupedScores.on_diagonals`)."""
    B, H, n, K = probs.shape
    G = (n + group - 2) // group + 1
    keys = torch.arange(K, device=probs.device)
    dist = pos[:, None] - keys                                                        # [n, K]
    slot = torch.where(dist >= 0, dist.div(group, rounding_mode="floor") -
                       (pos[0] - keys).div(group, rounding_mode="floor"), G)           # G: not on any diagonal
    out = torch.zeros(B, H, K, G + 1, dtype=probs.dtype, device=probs.device)
    out.scatter_add_(-1, slot.t().expand(B, H, K, n), probs.transpose(-1, -2))
    return out[..., :G]


class GroupedScores:
    """Column and diagonal mass of a sample of the last ``n`` queries (the contract of
    `estimators.triton_scores.SampleScores`): ``column``, ``column_off_local``, ``diagonal`` ``[B, Hs, Lk]`` fp32,
    plus ``by_group [B, Hs, Lk, G]`` (`column_mass_by_group` for diagonal groups of ``group`` keys) and ``lse [B, Hs,
    n]`` (natural log of each row's softmax sum), the rows sitting at key positions ``pos0 .. pos0 + n - 1``."""

    def __init__(self, column, column_off_local, diagonal, by_group, lse, pos0: int, group: int):
        self.column, self.column_off_local, self.diagonal = column, column_off_local, diagonal
        self.by_group, self.lse, self.pos0, self.group = by_group, lse, pos0, group

    def on_diagonals(self, picked: torch.Tensor, group: int) -> torch.Tensor:
        """Column mass lying on chosen diagonal groups: ``picked [B, Hs, n_groups + 1]`` (bool; the last slot must be
        False) -> [B, Hs, Lk]: per key, its ``G`` group slots weighed by whether their group is picked."""
        if group != self.group:
            raise InvalidArgumentError(f"group must be the {self.group} the scores were split by, got {group}")
        B, Hs, Lk, G = self.by_group.shape
        keys = torch.arange(Lk, device=picked.device)
        first = (self.pos0 - keys).div(group, rounding_mode="floor")[:, None] + torch.arange(G, device=picked.device)
        n_groups = picked.shape[-1] - 1
        index = torch.where((first >= 0) & (first < n_groups), first, n_groups).reshape(1, 1, -1)
        on = picked.gather(-1, index.expand(B, Hs, -1)).view(B, Hs, Lk, G)
        return (self.by_group * on).sum(-1)


def torch_sample_scores(q, k, last_q: int, scale: float, causal: bool = True, *, heads, sink, local, group: int,
                        max_bytes: int = 256 << 20) -> GroupedScores:
    """`GroupedScores` of the last ``n = min(last_q, Lq)`` queries of the query heads ``heads`` (long [Hs]) with ``sink``, ``local`` (long [Hs]) per head: the readable reference (softmax probabilities in
    memory, a chunk of KV heads at a time so they stay under ``max_bytes``; GQA without repeating KV), and the
    path where no fused pass runs."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    n, g = min(last_q, Lq), Hq // Hkv
    per_kv = max(1, max_bytes // max(B * g * n * Lk * 4 * 3, 1))
    keys = torch.arange(Lk, device=q.device)
    parts, slots = [], []
    for kv0 in range(0, Hkv, per_kv):
        kv1 = min(Hkv, kv0 + per_kv)
        mine = ((heads >= kv0 * g) & (heads < kv1 * g)).nonzero().flatten()            # slots of these KV heads
        if not mine.numel():
            continue
        logits, pos = last_query_logits(q[:, kv0 * g:kv1 * g], k[:, kv0:kv1], n, scale, causal)
        logits = logits.index_select(1, heads[mine] - kv0 * g)
        lse = torch.logsumexp(logits, -1)
        probs = (logits - lse[..., None]).exp_()
        col = column_mass(probs)
        dist = pos[:, None] - keys
        near = (dist >= 0) & (dist < local[mine, None, None])                            # [h, n, Lk]
        sinks = keys < sink[mine, None]                                                  # [h, Lk]
        parts.append((col, col - column_mass(probs * near), diagonal_mass(probs * ~sinks[:, None], pos),
                      column_mass_by_group(probs, pos, group), lse))
        slots.append(mine)
    order = torch.cat(slots).argsort()                      # back to the order of ``heads``
    column, off, diag, by_group, lse = (torch.cat(t, 1).index_select(1, order) for t in zip(*parts))
    return GroupedScores(column, off, diag, by_group, lse, Lk - n, group)
