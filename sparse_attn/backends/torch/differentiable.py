"""Sparse attention over a SparseLayout that autograd can differentiate (training through a sparse layout).

The fast kernels (the compiled CPU kernel, the torch backend's in-place softmax, Triton, CUDA) have no backward.
This is the readable formulation instead: every query block gathers the keys its tiles and columns list (one
fixed-width slot list per block, padding masked), scores them against its ``block_m`` rows, masks per row (causal,
bottom-right) and takes a softmax, all with out-of-place ops, so ``torch.autograd`` gives the exact gradient of
the sparse function (the layout itself is discrete and carries no gradient).  Memory is O(Lq x keys per block):
the gathered keys and the block scores, which autograd keeps for the backward; never O(Lq x Lk) unless the
layout lists every key.  The per-key definition it must equal is `reference_attention` with `SparseLayout.to_mask`.
"""
from __future__ import annotations

import torch

from ...layout import SparseLayout, query_positions


def differentiable_sparse_attention(q, k, v, layout: SparseLayout, *, causal: bool = True, scale: float,
                                    softcap: float = 0.0):
    """``q [B, Hq, Lq, D]`` over the keys ``layout`` lists in ``k, v [B, Hkv, Lk, D]`` (GQA by head index) ->
    ``[B, Hq, Lq, D]`` in q's dtype, computed in fp32 (fp64 for fp64 inputs).  A row with no visible key gets 0
    (and zero gradient).  Inputs are assumed checked (see `prefill.sparse_attention`)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bm, n_qb = layout.block_m, layout.num_query_blocks
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, listed = _block_key_slots(layout, Lk)                                     # [B, Hq, nQb, W]
    W = keys.shape[-1]
    kv_row = (torch.arange(B, device=q.device)[:, None] * Hkv
              + torch.arange(Hq, device=q.device)[None, :] // (Hq // Hkv)) * Lk      # [B, Hq]: first key row
    rows = (keys + kv_row[:, :, None, None]).reshape(-1)
    k_sel = k.to(work).reshape(-1, D).index_select(0, rows).view(B, Hq, n_qb, W, D)
    v_sel = v.to(work).reshape(-1, D).index_select(0, rows).view(B, Hq, n_qb, W, D)
    q_blocks = torch.nn.functional.pad(q.to(work), (0, 0, 0, n_qb * bm - Lq)).view(B, Hq, n_qb, bm, D)

    scores = torch.matmul(q_blocks, k_sel.transpose(-1, -2)) * scale                # [B, Hq, nQb, bm, W]
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = listed[:, :, :, None, :]
    if causal:
        pos = torch.nn.functional.pad(query_positions(Lq, Lk, q.device), (0, n_qb * bm - Lq), value=-1)
        allowed = allowed & (keys[:, :, :, None, :] <= pos.view(n_qb, bm)[None, None, :, :, None])
    # a finite fill keeps fully masked rows NaN-free (their softmax is discarded below, gradient included)
    scores = scores.masked_fill(~allowed, torch.finfo(work).min)
    probs = torch.where(allowed, torch.softmax(scores, dim=-1), 0.0)
    out = torch.matmul(probs, v_sel).view(B, Hq, n_qb * bm, D)[:, :, :Lq]
    return out.to(q.dtype)


def _block_key_slots(layout: SparseLayout, Lk: int):
    """The keys each query block lists, as fixed-width slots: (keys int64 ``[B, H, nQb, W]`` clamped into
    ``[0, Lk)``, listed bool ``[B, H, nQb, W]``).  Slots are the block's tiles (``block_n`` keys each, the part
    inside the sequence) then its columns; ``W`` is the widest block's tile and column count."""
    dev = layout.device
    n_tiles = int(layout.block_count.max()) if layout.block_count.numel() else 0
    n_cols = int(layout.column_count.max()) if layout.column_count.numel() else 0
    step = torch.arange(layout.block_n, device=dev)
    offsets = layout.block_offset[..., :n_tiles].long()
    tile_keys = (offsets[..., None] + step).flatten(-2)                             # [B, H, nQb, T * bn]
    tile_used = torch.arange(n_tiles, device=dev) < layout.block_count[..., None]
    tile_listed = tile_used.repeat_interleave(layout.block_n, -1) & (tile_keys >= 0) & (tile_keys < Lk)
    columns = layout.column_index[..., :n_cols].long()
    col_listed = (torch.arange(n_cols, device=dev) < layout.column_count[..., None]) & (columns < Lk)
    keys = torch.cat([tile_keys, columns], -1).clamp(0, max(Lk - 1, 0))
    return keys, torch.cat([tile_listed, col_listed], -1)
