"""Attention of an arbitrary sample of query rows (not only the last ones) against all keys, for estimators that
look at each modality's own last queries.  Memory O(n x Lk) per head; all heads at once, GQA without repeating KV."""
from __future__ import annotations

import torch

from ..layout import SparseLayout


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
    (what `rows_kept_mass` reads a layout's kept mass from)."""
    probs = rows_probs(q, k, rows, scale, causal)[0]
    probs = probs.index_select(1, heads)                 # (a check that heads are all of them would sync a GPU)
    return torch.nn.functional.pad(probs.cumsum(-1), (1, 0))


def rows_kept_mass(q, k, rows: torch.Tensor, scale: float, causal: bool = True, *, heads: torch.Tensor,
                   layout: SparseLayout) -> torch.Tensor:
    """Mean softmax mass ``[B, Hs]`` that the query rows ``rows`` (long [R]) of the query heads ``heads`` keep on
    the keys ``layout`` (over those heads) lists for their query blocks: the readable reference of the fused CPU
    pass `cpu_scores.cpu_rows_kept_mass` (how Auto judges a candidate on held-out rows)."""
    prefix = rows_prefix_mass(q, k, rows, scale, causal, heads=heads)
    return layout_kept_mass(layout, prefix, rows // layout.block_m)


def layout_kept_mass(layout: SparseLayout, prefix: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Mean mass ``[B, H]`` that the rows whose softmax prefix sums are ``prefix [B, H, R, Lk + 1]`` (rows in the
    query blocks ``blocks [R]``) keep on ``layout``'s keys: a tile's mass is a difference of prefix sums, a column's
    another, so a row costs O(tiles + columns) (a key mask per row cost a fifth of the estimate at 32K).  Valid
    layouts list no key twice; keys after a row's position have zero probability."""
    Lk = prefix.shape[-1] - 1
    blocks = blocks.to(layout.device)
    off = layout.block_offset.index_select(2, blocks).long()
    used = torch.arange(off.shape[-1], device=off.device) < layout.block_count.index_select(2, blocks)[..., None]
    # padding entries may hold anything: clamped so that the gathers stay in bounds, then masked
    tiles = prefix.gather(-1, (off + layout.block_n).clamp(0, Lk)) - prefix.gather(-1, off.clamp(0, Lk))
    cols = layout.column_index.index_select(2, blocks).long().clamp(0, Lk - 1)
    used_c = torch.arange(cols.shape[-1], device=cols.device) < layout.column_count.index_select(2, blocks)[..., None]
    columns = prefix.gather(-1, cols + 1) - prefix.gather(-1, cols)
    return ((tiles * used).sum(-1) + (columns * used_c).sum(-1)).mean(-1)
