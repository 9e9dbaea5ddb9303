"""Dense attention oracle: fp32 (or fp64) inside, explicit mask, bottom-right causal alignment.

O(Lq x Lk) memory by design: it is the readable reference every fast path is tested against."""
from __future__ import annotations

import torch

from .checks import check_attention_inputs, check_softcap, resolve_scale
from ..errors import InvalidArgumentError


def reference_attention(q, k, v, mask=None, *, causal: bool = True, scale=None, return_lse: bool = False,
                        softcap: float = 0.0):
    """Softmax attention of ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, Lk, D]`` (GQA by head index).

    ``mask``: optional bool, broadcastable to ``[B, Hq, Lq, Lk]``, True = may attend.  With ``causal`` the query
    rows are the last ``Lq`` key positions (bottom-right).  A row that may attend to nothing gets output 0 and
    LSE -inf.  Returns the output in q's dtype and, with ``return_lse``, the natural-log LSE ``[B, Hq, Lq]``
    (fp32) of the scaled scores.  ``softcap > 0`` soft-caps the scaled scores to ``softcap * tanh(s / softcap)``
    before the mask and softmax (Gemma-2; the LSE is then that of the capped scores)."""
    check_attention_inputs(q, k, v)
    softcap = check_softcap(softcap)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = resolve_scale(scale, D)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = Hq // Hkv
    qf = q.to(work).reshape(B, Hkv, group, Lq, D)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qf, k.to(work)).reshape(B, Hq, Lq, Lk) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        pos = torch.arange(Lq, device=q.device) + (Lk - Lq)
        allowed = torch.arange(Lk, device=q.device)[None, :] <= pos[:, None]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise InvalidArgumentError("mask must be a bool tensor broadcastable to [B, Hq, Lq, Lk] (True = attend)")
        allowed = allowed & mask
    allowed = allowed.expand(B, Hq, Lq, Lk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp(min=torch.finfo(work).min))
    probs = torch.where(allowed, probs, torch.zeros((), dtype=work, device=q.device))
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs.reshape(B, Hkv, group, Lq, Lk), v.to(work))
    out = out.reshape(B, Hq, Lq, D).to(q.dtype)
    return (out, lse.float()) if return_lse else out
