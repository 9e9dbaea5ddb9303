"""Synthetic decode workload where queries and keys are differently distributed, as in real models.

Per KV head (128-d by default; half *semantic*, half *positional* channels):
* keys = a large shared offset (every key) + RoPE-like positional pairs with a large amplitude rotating with the
  position + a *topic* component ``s_i u_t`` (topic ``t`` of ``T``, heavy-tailed strength ``s_i``) + noise;
* queries = a different offset + the same RoPE pairs at a small amplitude + ``A u_t`` for the topic they ask about
  + noise;
* the first keys are attention sinks (aligned with the queries' offset).
So most of the keys' variance lies in directions queries barely read (as with real keys' outlier / RoPE channels),
the top keys of a query are the strongest keys of its topic (a few hundred of ~N/T), and exact top-k is meaningful.
Prefill queries (for attention-aware indexes) and decode queries are independent draws of the same distribution.
O(N x D) time and memory, generated in chunks; deterministic in ``seed``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class DecodeWorkload:
    keys: int = 131072            # tokens per KV head
    kv_heads: int = 1
    q_heads: int = 4
    head_dim: int = 128
    keys_per_topic: int = 1024
    prefill_queries: int = 4096   # per KV head (spread over its query heads)
    decode_rows: int = 1          # decode query rows per query head
    sinks: int = 4
    topic_logit: float = 3.0      # an on-topic key's logit is topic_logit x Exp(1) (heavy-tailed strength)
    seed: int = 0


def make_decode_workload(w: DecodeWorkload = DecodeWorkload(), dtype=torch.float32):
    """Returns ``k, v [1, Hkv, N, D]``, prefill queries ``[1, Hq, P, D]`` (P = prefill_queries / group, at random
    positions) and decode queries ``[1, Hq, decode_rows, D]`` (at position N)."""
    if w.head_dim % 4 or w.head_dim < 16:
        raise InvalidArgumentError(f"head_dim must be a multiple of 4 and >= 16, got {w.head_dim}")
    if w.q_heads % w.kv_heads:
        raise InvalidArgumentError(f"q_heads ({w.q_heads}) must be a multiple of kv_heads ({w.kv_heads})")
    N, D, Hkv, g = w.keys, w.head_dim, w.kv_heads, w.q_heads // w.kv_heads
    sem, pairs = D // 2, D // 4
    T = max(1, N // w.keys_per_topic)
    n_prefill = max(1, w.prefill_queries // g)
    k = torch.empty(1, Hkv, N, D, dtype=dtype)
    v = torch.empty(1, Hkv, N, D, dtype=dtype)
    qp = torch.empty(1, Hkv * g, n_prefill, D, dtype=dtype)
    qd = torch.empty(1, Hkv * g, w.decode_rows, D, dtype=dtype)
    theta = 10000.0 ** (-torch.arange(pairs, dtype=torch.float64) / pairs)
    for h in range(Hkv):
        gen = torch.Generator().manual_seed(w.seed * 1000 + h)
        topics = torch.nn.functional.normalize(torch.randn(T, sem, generator=gen), dim=-1)
        k_offset = torch.randn(D, generator=gen) * (6.0 / math.sqrt(D))
        q_offset = torch.randn(D, generator=gen) * (3.0 / math.sqrt(D))
        amp_q = math.sqrt(w.topic_logit * math.sqrt(D))            # A: query topic amplitude
        amp_k = amp_q                                              # logit = A^2 Exp(1) / sqrt(D)
        for start in range(0, N, 1 << 17):
            n = min(1 << 17, N - start)
            pos = torch.arange(start, start + n)
            t = torch.randint(0, T, (n,), generator=gen)
            strength = amp_k * -torch.rand(n, generator=gen).clamp(min=1e-12).log()      # A x Exp(1)
            chunk = torch.empty(n, D)
            chunk[:, :sem] = strength[:, None] * topics[t] + 0.3 * torch.randn(n, sem, generator=gen)
            chunk[:, sem:] = _rope_pairs(pos, theta, 3.0, gen)
            chunk += k_offset
            if start == 0:
                chunk[:w.sinks] += q_offset * (12.0 * math.sqrt(D) / (q_offset @ q_offset).item())
            k[0, h, start:start + n] = chunk.to(dtype)
            v[0, h, start:start + n] = torch.randn(n, D, generator=gen).to(dtype)

        def queries(count, positions):
            tq = torch.randint(0, T, (count,), generator=gen)
            q = torch.empty(count, D)
            q[:, :sem] = amp_q * topics[tq] + 0.3 * torch.randn(count, sem, generator=gen)
            q[:, sem:] = _rope_pairs(positions, theta, 0.3, gen)
            return q + q_offset

        for j in range(g):
            qp[0, h * g + j] = queries(n_prefill, torch.randint(0, N, (n_prefill,), generator=gen)).to(dtype)
            qd[0, h * g + j] = queries(w.decode_rows, torch.full((w.decode_rows,), N)).to(dtype)
    return k, v, qp, qd


def _rope_pairs(pos, theta, amplitude, gen):
    """RoPE-like positional channels ``[n, 2 * pairs]``: pair f rotated by ``pos * theta[f]`` from a random
    per-token phase jitter, at ``amplitude`` (large for keys, small for queries)."""
    angle = pos[:, None].double() * theta[None, :] + 0.3 * torch.randn(len(pos), len(theta), generator=gen).double()
    return (amplitude * torch.stack([angle.cos(), angle.sin()], -1).flatten(-2)).float()
