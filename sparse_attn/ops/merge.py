"""Merge partial attention results over disjoint key sets by their log-sum-exp."""
from __future__ import annotations

import torch


def merge_partials(outs, lses):
    """``outs``: partial outputs [..., L, D] over disjoint key sets; ``lses``: their natural-log LSE [..., L]
    (-inf where a part saw no key).  Returns (out, lse) of attention over the union of the key sets, computed in
    fp32 (fp64 when the outputs are fp64); out keeps the outputs' dtype, lse the LSEs'."""
    work = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    lse = torch.stack([l.to(work) for l in lses]).logsumexp(0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.zeros_like(outs[0], dtype=work)
    for o, l in zip(outs, lses):
        out += o.to(work) * torch.exp(l.to(work) - safe)[..., None]
    return out.to(outs[0].dtype), lse.to(lses[0].dtype)
