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


def merge_into(out, lse, part_out, part_lse, step_bytes: int = 4 << 20):
    """`merge_partials` of two parts written into the first, in place: ``out [N, ..., D]``, ``lse [N, ...]`` (fp32
    or fp64; views of any strides) take the merge with ``part_out``, ``part_lse`` (same shapes and dtypes;
    ``part_out`` is overwritten).  Goes about ``step_bytes`` of ``out`` at a time along N, so the operands stay in
    cache and nothing large is allocated."""
    rows_per_step = max(1, step_bytes // max(1, out[0].numel() * out.element_size()))
    for s in range(0, out.shape[0], rows_per_step):
        o, l, po, pl = (t[s:s + rows_per_step] for t in (out, lse, part_out, part_lse))
        top = torch.maximum(l, pl)
        top = torch.where(torch.isinf(top), torch.zeros_like(top), top)        # both parts empty: weights 0
        w, pw = torch.exp(l - top), torch.exp(pl - top)
        total = w + pw
        o.mul_(w[..., None]).add_(po.mul_(pw[..., None]))
        o.div_(torch.where(total > 0, total, 1.0)[..., None])
        l.copy_(top + torch.log(total))
