"""Retrieval decode attention: exact attention over the device window, plus attention over the top-k keys the
index retrieves from the offloaded tiers, merged by log-sum-exp.

Per step the work is O(window + top_k) plus the index search; nothing else scales with the context."""
from __future__ import annotations

import torch

from ..backends.checks import resolve_scale
from ..backends.merge import merge_partials
from ..errors import InvalidArgumentError


def _check(q, cache, top_k):
    reasons = []
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        reasons.append(f"top_k must be a positive int, got {top_k!r}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not q.is_floating_point():
        reasons.append(f"q must be a floating [B, Hq, Lq, D] tensor, got "
                       f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    elif cache.dim is None:
        reasons.append("cache is empty: append k, v before attending")
    else:
        B, Hq, Lq, D = q.shape
        if D != cache.dim:
            reasons.append(f"q head dim ({D}) must equal the cache's head dim ({cache.dim})")
        if Hq % cache.kv_heads:
            reasons.append(f"q heads ({Hq}) must be a multiple of the cache's KV heads ({cache.kv_heads}) (GQA)")
        if B != cache.batch:
            reasons.append(f"q batch ({B}) must equal the cache's batch ({cache.batch})")
        if Lq > cache.seq_len:
            reasons.append(f"q rows ({Lq}) must be <= tokens in the cache ({cache.seq_len})")
    if reasons:
        raise InvalidArgumentError("retrieval_attention: " + "; ".join(reasons))


def _attend(q, keys, values, mask, scale):
    """``q [S, m, D]``; ``keys, values [S, n, D]`` shared by the rows or ``[S, m, n, D]`` per row; ``mask``
    bool broadcastable to ``[S, m, n]`` or None.  Returns ``out [S, m, D]`` (fp32) and ``lse [S, m]``."""
    qf = q.float()
    if keys.dim() == 3:
        logits = torch.bmm(qf, keys.float().transpose(1, 2)) * scale
    else:
        logits = torch.einsum("smd,smnd->smn", qf, keys.float()) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - lse.clamp(min=torch.finfo(torch.float32).min)[..., None])
    probs = probs.nan_to_num(0.0)
    if values.dim() == 3:
        out = torch.bmm(probs, values.float())
    else:
        out = torch.einsum("smn,smnd->smd", probs, values.float())
    return out, lse


def retrieval_attention(q, cache, top_k: int, *, scale=None, return_lse: bool = False,
                        return_indices: bool = False, return_stats: bool = False):
    """Decode attention of ``q [B, Hq, Lq, D]`` (the last ``Lq`` tokens, already appended to ``cache``) over a
    :class:`~sparse_attn.retrieval.RetrievalKVCache`.

    Static part: every token in the device window (sinks + recent), with the bottom-right causal mask among the
    new rows.  Retrieved part: per query row, the ``top_k`` offloaded keys with the largest ``q . k`` that the
    cache's index finds (every query head of every KV head in one index call), gathered from RAM/SSD, scored in
    fp32 whatever the storage dtype.  Returns ``out [B, Hq, Lq, D]`` in q's dtype, then, as asked:
    ``lse [B, Hq, Lq]`` (natural log, fp32) with ``return_lse``; ``indices [B, Hq, Lq, top_k]`` int64 with
    ``return_indices``: the token positions of the retrieved keys each query row attended (-1 = none; the window's
    tokens are not listed, every row attends all of them); a dict with ``return_stats``: ``scanned`` and ``read``
    ``[B, Hq, Lq]`` (keys the index scored per row, and keys it read in full: for the fast index, codes scanned
    and keys re-ranked), ``offloaded`` (keys outside the window).
    Thread counts are the caller's (torch's and faiss's own settings); nothing global is changed.

    Arguments:
        q: ``[batch, Hq, Lq, head_dim]``, the queries of the last Lq tokens (already appended to ``cache``);
            ``Hq`` a multiple of the cache's KV heads (GQA: every query head of a KV head searches its index).
        cache: a `RetrievalKVCache` holding the context (``cache.append(k, v)``).
        top_k: offloaded keys retrieved per query row (> 0); all of them when it covers every offloaded key.
        scale: softmax scale (default ``head_dim ** -0.5``).

    Raises:
        ValueError / TypeError (`sparse_attn.errors`) naming the argument: q's shape, dtype or batch against the
        cache, Lq past the cached tokens, a non-positive ``top_k``."""
    _check(q, cache, top_k)
    B, Hq, Lq, D = q.shape
    Hkv, S = cache.kv_heads, B * cache.kv_heads
    g = Hq // Hkv
    scale = resolve_scale(scale, D)
    rows = q.reshape(S, g * Lq, D)                         # the query group of each KV head, rows (head, position)
    wk, wv = cache.window.k, cache.window.v
    q_pos = torch.arange(cache.seq_len - Lq, cache.seq_len, device=q.device).repeat(g)     # [g * Lq]
    mask = (cache.window.pos.to(q.device)[None, :] <= q_pos[:, None])[None]
    out_s, lse_s = _attend(rows, wk.reshape(S, -1, D).to(q.device), wv.reshape(S, -1, D).to(q.device), mask, scale)
    outs, lses = [out_s], [lse_s]
    none = torch.zeros(S, g * Lq, dtype=torch.int64)
    scanned, read, positions = none, none, torch.full((S, g * Lq, top_k), -1, dtype=torch.int64)
    if cache.n_offloaded:
        cache.sync_index()
        ids, scanned, read = cache.index.search(rows.detach().float().cpu(), top_k)      # [S, m, k]
        k_eff = ids.shape[-1]
        # offloaded token i sits at position n_sink + i; rows may not see keys after them (only when Lq > window)
        valid = (ids >= 0) & (ids + cache.window.n_sink <= q_pos.cpu()[None, :, None])
        positions[..., :k_eff] = (ids + cache.window.n_sink).masked_fill(~valid, -1)
        keys, values = cache.gather(ids.clamp(min=0).view(S, -1))
        keys = keys.view(S, g * Lq, k_eff, D).to(q.device)
        values = values.view(S, g * Lq, k_eff, D).to(q.device)
        out_r, lse_r = _attend(rows, keys, values, valid.to(q.device), scale)
        outs.append(out_r)
        lses.append(lse_r)
    out, lse = merge_partials(outs, lses)
    out = out.view(B, Hq, Lq, D).to(q.dtype)
    result = (out,)
    if return_lse:
        result += (lse.view(B, Hq, Lq).float(),)
    if return_indices:
        result += (positions.view(B, Hq, Lq, -1),)
    if return_stats:
        result += ({"offloaded": cache.n_offloaded, "scanned": scanned.view(B, Hq, Lq),
                    "read": read.view(B, Hq, Lq)},)
    return result[0] if len(result) == 1 else result
