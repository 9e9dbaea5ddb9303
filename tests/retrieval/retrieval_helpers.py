"""Shared inputs for the retrieval tests: seeded KV with per-batch-row content, and a filled cache."""
from __future__ import annotations

import torch

from sparse_attn.retrieval import RetrievalKVCache


def decode_inputs(B=2, Hq=4, Hkv=2, L=113, D=64, Lq=1, seed=0):
    """``q [B, Hq, Lq, D]`` (the last Lq positions) and ``k, v [B, Hkv, L, D]``; batch rows differ."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, L, D, generator=gen)
    v = torch.randn(B, Hkv, L, D, generator=gen)
    q = torch.randn(B, Hq, Lq, D, generator=gen) * 1.5
    return q, k, v


def filled_cache(k, v, *, chunks=(0.5,), **kwargs):
    """A RetrievalKVCache fed ``k, v`` in pieces (split at the given fractions of L), as prefill + decode would."""
    cache = RetrievalKVCache(**kwargs)
    L = k.shape[2]
    cuts = sorted({0, L, *[int(f * L) for f in chunks]})
    for a, b in zip(cuts[:-1], cuts[1:]):
        cache.append(k[:, :, a:b], v[:, :, a:b])
    return cache
