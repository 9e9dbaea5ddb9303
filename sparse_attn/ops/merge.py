"""Merge partial attention results over disjoint key sets by their log-sum-exp."""
from __future__ import annotations

import torch


def merge_partials(outs, lses):
    """``outs``: partial outputs [..., L, D] over disjoint key sets; ``lses``: their natural-log LSE [..., L]
    (-inf where a part saw no key).  Returns (out, lse) of attention over the union of the key sets."""
    lse = torch.stack(list(lses)).logsumexp(0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.zeros_like(outs[0], dtype=torch.float32)
    for o, l in zip(outs, lses):
        out += o.float() * torch.exp(l - safe)[..., None]
    return out.to(outs[0].dtype), lse
