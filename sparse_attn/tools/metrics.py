"""Quality metrics of a layout against dense attention, computed a chunk of query blocks at a time (never L x L)."""
from __future__ import annotations

import torch

from ..layout import SparseLayout, ceil_div
from ..errors import InvalidArgumentError


def attention_recall(q, k, layout: SparseLayout, *, causal: bool = True, scale=None, rows_per_chunk: int = 512):
    """Mean over query rows (and heads, batch) of the dense attention mass that falls on the layout's keys."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    g = Hq // Hkv
    bm = layout.block_m
    step = max(bm, rows_per_chunk // bm * bm)
    total = 0.0
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, g, r1 - r0, D)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", qc, k.float()).reshape(B, Hq, r1 - r0, Lk) * scale
        if causal:
            pos = torch.arange(r0, r1, device=q.device) + (Lk - Lq)
            logits.masked_fill_(torch.arange(Lk, device=q.device) > pos[:, None], float("-inf"))
        probs = torch.softmax(logits, -1)
        member = layout.block_key_mask(slice(r0 // bm, ceil_div(r1, bm)))
        member = member.repeat_interleave(bm, dim=2)[:, :, :r1 - r0]
        total += float((probs * member).sum())
    return total / (B * Hq * Lq)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def attention_recall_per_head(q, k, layouts, *, causal: bool = True, scale=None, max_bytes: int = 128 << 20):
    """Dense attention mass on each layout's keys, per query head: fp32 ``[len(layouts), Hq]``, the mean over batch
    rows and query rows.  ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``; every layout is ``[B, Hq]`` over (Lq, Lk)
    with the same ``block_m``, and valid (no key listed twice, as `SparseLayout.check_indices` requires).

    The dense probabilities of a chunk of query blocks (at most about ``max_bytes`` of them) are computed once and
    summed per query block; a prefix sum over the keys then gives each tile's mass by two lookups, so a layout
    costs O(tiles + columns), not O(Lk), per query block."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if not layouts:
        return torch.zeros(0, Hq, device=q.device)
    bm = layouts[0].block_m
    if any(lay.block_m != bm or (lay.q_len, lay.k_len) != (Lq, Lk) for lay in layouts):
        raise InvalidArgumentError(f"layouts must all have block_m={bm} and (q_len, k_len)=({Lq}, {Lk})")
    scale = D ** -0.5 if scale is None else scale
    g = Hq // Hkv
    step = max(1, max_bytes // max(B * Hq * bm * Lk * 4, 1)) * bm
    total = torch.zeros(len(layouts), Hq, dtype=torch.float64, device=q.device)
    kf = k.float()
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        n = r1 - r0
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, g, n, D)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", qc, kf).reshape(B, Hq, n, Lk) * scale
        if causal:
            pos = torch.arange(r0, r1, device=q.device) + (Lk - Lq)
            logits.masked_fill_(torch.arange(Lk, device=q.device) > pos[:, None], float("-inf"))
        probs = torch.softmax(logits, -1)
        blocks = ceil_div(n, bm)
        if blocks * bm != n:                                                          # a partial last block
            probs = torch.nn.functional.pad(probs, (0, 0, 0, blocks * bm - n))
        mass = probs.reshape(B, Hq, blocks, bm, Lk).sum(3)
        del probs, logits
        prefix = torch.nn.functional.pad(mass.double().cumsum(-1), (1, 0))           # [B, Hq, blocks, Lk + 1]
        chunk = slice(r0 // bm, r0 // bm + blocks)
        for i, lay in enumerate(layouts):
            total[i] += _layout_mass(lay, chunk, mass, prefix)
    return (total / max(B * Lq, 1)).float()


def _layout_mass(layout: SparseLayout, chunk: slice, mass, prefix):
    """Per head, the mass ``[Hq]`` (fp64) on the keys ``layout`` lists for the query blocks ``chunk``, from the
    per-block key mass ``mass [B, Hq, blocks, Lk]`` and its prefix sum ``prefix [..., Lk + 1]``."""
    Lk = mass.shape[-1]
    off = layout.block_offset[:, :, chunk].long()
    used = torch.arange(off.shape[-1], device=off.device) < layout.block_count[:, :, chunk, None]
    start = off.clamp(0, Lk)
    end = (off + layout.block_n).clamp(0, Lk)
    tiles = ((prefix.gather(-1, end) - prefix.gather(-1, start)) * used).sum((0, 2, 3))
    cols = layout.column_index[:, :, chunk].long()
    used_c = torch.arange(cols.shape[-1], device=cols.device) < layout.column_count[:, :, chunk, None]
    columns = (mass.gather(-1, cols.clamp(0, Lk - 1)).double() * used_c).sum((0, 2, 3))
    return tiles + columns
