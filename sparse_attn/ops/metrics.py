"""Quality metrics of a layout against dense attention, computed a chunk of query blocks at a time (never L x L)."""
from __future__ import annotations

import torch

from ..layout import SparseLayout


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
        member = layout.block_key_mask(slice(r0 // bm, -(-r1 // bm)))
        member = member.repeat_interleave(bm, dim=2)[:, :, :r1 - r0]
        total += float((probs * member).sum())
    return total / (B * Hq * Lq)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))
