"""Shared helpers for the sparse_attn tests: seeded BHLD inputs, independent dense references, comparisons,
random layouts and pattern cases.

Everything here is independent of the package's kernels: the masks and dense attentions are written out with plain
torch so that a bug in the package cannot hide in the helper that checks it."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


CONTIGUITY = ("contiguous", "blhd", "strided")
HEAD_CONFIGS = {"mha": (3, 3), "gqa": (4, 2), "mqa": (4, 1)}


# ---------------------------------------------------------------------------------------------------- inputs
def _randn(shape, gen, dtype, contiguity):
    """A BHLD tensor of ``shape`` whose memory layout is ``contiguity``: plain, a transposed BLHD tensor, or a view
    with stride 2 along the head dim (and a transposed seq/head pair)."""
    B, H, L, D = shape
    if contiguity == "contiguous":
        t = torch.randn(B, H, L, D, generator=gen)
    elif contiguity == "blhd":
        t = torch.randn(B, L, H, D, generator=gen).transpose(1, 2)
    elif contiguity == "strided":
        t = torch.randn(B, L, H, 2 * D, generator=gen).transpose(1, 2)[..., ::2]
    else:
        raise ValueError(contiguity)
    return t.to(dtype)


def make_qkv(B=2, Hq=2, Hkv=None, Lq=64, Lk=None, D=64, *, dtype=torch.float32, seed=0,
             contiguity="contiguous", structured=False):
    """Seeded ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``; every batch row has different content.

    ``structured=True`` adds a few heavy key columns at positions that differ per batch row (and a query bias that
    attends to them), so data-dependent estimators pick different layouts for different rows."""
    Hkv = Hq if Hkv is None else Hkv
    Lk = Lq if Lk is None else Lk
    gen = torch.Generator().manual_seed(seed)
    q = _randn((B, Hq, Lq, D), gen, torch.float32, contiguity)
    k = _randn((B, Hkv, Lk, D), gen, torch.float32, contiguity)
    v = _randn((B, Hkv, Lk, D), gen, torch.float32, contiguity)
    if structured:
        direction = torch.randn(B, Hkv, 1, D, generator=gen)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        heavy = torch.zeros(B, Hkv, Lk, 1)
        n_heavy = max(1, Lk // 50)
        for b in range(B):
            for h in range(Hkv):
                idx = torch.randperm(Lk, generator=gen)[:n_heavy]
                heavy[b, h, idx] = 1.0
        k = k + 4.0 * heavy * direction
        q = q + 2.0 * direction.repeat_interleave(Hq // Hkv, dim=1)
        q, k = _as_contiguity(q, contiguity), _as_contiguity(k, contiguity)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for b in range(1, B):
        assert not torch.equal(q[0], q[b]) and not torch.equal(k[0], k[b])
    if contiguity != "contiguous" and Lq > 1 and Hq > 1:
        assert not q.is_contiguous()
    return q, k, v


def _as_contiguity(t, contiguity):
    B, H, L, D = t.shape
    if contiguity == "contiguous":
        return t.contiguous()
    if contiguity == "blhd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.empty(B, L, H, 2 * D).transpose(1, 2)[..., ::2]
    out.copy_(t)
    return out


# ---------------------------------------------------------------------------------------------------- references
def causal_mask(q_len, k_len, device="cpu"):
    """Bool [q_len, k_len], bottom-right aligned: query row i sits at key position i + k_len - q_len."""
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return torch.arange(k_len, device=device)[None, :] <= rows


def plain_attention(q, k, v, mask=None, *, causal=True, scale=None, work=None, softcap=0.0):
    """Dense attention written out with torch ops in ``work`` precision (q's dtype by default) on q's device: the
    'plain torch' baseline of FlashAttention-style tolerances (``softcap``: Gemma-2's ``cap * tanh(s / cap)``,
    also in ``work`` precision).  Rows without keys give NaN; avoid them."""
    work = q.dtype if work is None else work
    Hq, Hkv, Lq, Lk, D = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    scale = D ** -0.5 if scale is None else scale
    kk = k.to(work).repeat_interleave(Hq // Hkv, dim=1)
    vv = v.to(work).repeat_interleave(Hq // Hkv, dim=1)
    s = (q.to(work) @ kk.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = causal_mask(Lq, Lk, q.device)
    if mask is not None:
        allowed = allowed & mask.to(q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ vv


def sdpa(q, k, v, *, causal=True, scale=None):
    """Dense attention through torch SDPA with an explicit bottom-right causal mask and repeated KV."""
    Hq, Hkv, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    mask = causal_mask(Lq, Lk) if causal else None
    return F.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1),
                                          attn_mask=mask, scale=scale)


def lse_fp64(q, k, mask=None, *, causal=True, scale=None):
    """Log-sum-exp of the scaled scores in fp64, -inf where a row sees nothing."""
    Hq, Hkv, Lq, Lk, D = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    scale = D ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * scale
    allowed = causal_mask(Lq, Lk) if causal else torch.ones(Lq, Lk, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    return torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1)


# ---------------------------------------------------------------------------------------------------- comparisons
def assert_close(actual, expected, atol=1e-5, rtol=1e-5, what="output"):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches, max err {err.max().item():.3g}, first at {idx}: "
                             f"{a[idx].item()} vs {e[idx].item()}")


def assert_lse_close(actual, expected, atol=1e-5, rtol=1e-5):
    assert actual.shape == expected.shape, f"lse: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == torch.float32, f"lse must be fp32, got {actual.dtype}"
    a_inf, e_inf = torch.isneginf(actual), torch.isneginf(expected)
    assert torch.equal(a_inf, e_inf), (f"lse: -inf rows differ ({int(a_inf.sum())} vs {int(e_inf.sum())}), first at "
                                       f"{tuple((a_inf ^ e_inf).nonzero()[0].tolist())}")
    assert not torch.isnan(actual).any() and not torch.isposinf(actual).any(), "lse: NaN or +inf"
    assert_close(actual[~a_inf], expected[~e_inf].to(actual.dtype), atol=atol, rtol=rtol, what="lse")


# ---------------------------------------------------------------------------------------------------- layouts
def random_layout(rng: random.Random, B, H, q_len, k_len, block_m, block_n, *, aligned=False, p_column=0.3,
                  shuffle=True, junk_padding=True, max_tiles=None):
    """A valid SparseLayout: per (b, h, query block), non-overlapping tiles at arbitrary (or block_n-aligned)
    offsets, plus single columns outside every tile.  Entries are in random order and the padding holds junk
    (the format says padding is never read).  Returns the layout and, for checking, the per-block key sets."""
    import sparse_attn as sa

    n_qb = -(-q_len // block_m)
    rows_tiles, rows_cols = [], []
    for _ in range(B * H * n_qb):
        starts = []
        if aligned:
            n_kb = -(-k_len // block_n)
            starts = [j * block_n for j in range(n_kb) if rng.random() < rng.choice((0.2, 0.5, 0.9))]
        else:
            p_tile = rng.choice((0.0, 0.3, 0.6, 0.95))
            pos = rng.randrange(0, max(1, 2 * block_n))
            while pos < k_len:
                if rng.random() < p_tile:
                    starts.append(pos)
                    pos += block_n + rng.choice((0, 0, rng.randrange(0, 2 * block_n)))
                else:
                    pos += rng.randrange(1, 2 * block_n)
        if max_tiles is not None:
            starts = starts[:max_tiles]
        covered = set()
        for s in starts:
            covered.update(range(s, min(s + block_n, k_len)))
        cols = []
        if not aligned:
            p_col = rng.choice((0.0, 0.05, p_column))
            cols = [c for c in range(k_len) if c not in covered and rng.random() < p_col]
        if shuffle:
            rng.shuffle(starts)
            rng.shuffle(cols)
        rows_tiles.append(starts)
        rows_cols.append(cols)
    max_b = max([len(t) for t in rows_tiles] + [0]) + (1 if junk_padding else 0)
    max_c = max([len(c) for c in rows_cols] + [0]) + (1 if junk_padding and not aligned else 0)

    def pack(rows, width):
        count = torch.tensor([len(r) for r in rows], dtype=torch.int32).reshape(B, H, n_qb)
        data = torch.zeros(B * H * n_qb, width, dtype=torch.int32)
        for i, r in enumerate(rows):
            data[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
            if junk_padding:
                for j in range(len(r), width):
                    data[i, j] = rng.choice((-7, 0, 1, k_len - 1, k_len, k_len + 1000, r[0] if r else 3))
        return count, data.reshape(B, H, n_qb, width)

    bc, bo = pack(rows_tiles, max_b)
    cc, ci = pack(rows_cols, max_c)
    layout = sa.SparseLayout(bc, bo, cc, ci, q_len=q_len, k_len=k_len, block_m=block_m, block_n=block_n)
    return layout, rows_tiles, rows_cols


def mask_from_sets(rows_tiles, rows_cols, B, H, q_len, k_len, block_m, block_n):
    """Bool [B, H, q_len, k_len] built key by key from the tile starts and columns (independent of to_mask)."""
    n_qb = -(-q_len // block_m)
    mask = torch.zeros(B * H * n_qb, k_len, dtype=torch.bool)
    for i, (tiles, cols) in enumerate(zip(rows_tiles, rows_cols)):
        for s in tiles:
            mask[i, s:min(s + block_n, k_len)] = True
        for c in cols:
            mask[i, c] = True
    mask = mask.reshape(B, H, n_qb, k_len)
    return mask.repeat_interleave(block_m, dim=2)[:, :, :q_len]


def per_head_mix(n_heads, L):
    """A per-head list mixing the pattern families (budgets small enough to be sparse at L ~ 1000); heads of one
    family are not adjacent, so the estimator must regroup and reorder them."""
    import sparse_attn as sa

    families = [sa.VerticalSlash(vertical=32, slash=128, sink=8, local=64), sa.AShape(sink=16, local=64),
                sa.VerticalSlash(vertical=64, slash=256, gamma=0.8, sink=8), sa.BlockSparse(top_k=3), sa.Dense(),
                sa.BlockSparse(gamma=0.7)]
    return [families[i % len(families)] for i in range(n_heads)]


def round_up(x, m):
    return int(math.ceil(x / m) * m)


def pattern_cases():
    """Named patterns for parametrized tests; "mix" is resolved per head count by `resolve_pattern`."""
    import sparse_attn as sa

    return {
        "ashape": sa.AShape(sink=8, local=64),
        "vslash": sa.VerticalSlash(vertical=32, slash=128, sink=8, local=64),
        "vslash_gamma": sa.VerticalSlash(vertical=64, slash=256, gamma=0.9, sink=8, local=64),
        "block_topk": sa.BlockSparse(top_k=3),
        "block_gamma": sa.BlockSparse(gamma=0.5),
        "dense": sa.Dense(),
        "mix": "mix",
    }


def resolve_pattern(name, n_heads, L=1000):
    p = pattern_cases()[name]
    return per_head_mix(n_heads, L) if p == "mix" else p


def pattern_strategy():
    """Hypothesis strategy for any valid pattern with small, random budgets."""
    from hypothesis import strategies as st

    import sparse_attn as sa

    gammas = st.one_of(st.none(), st.floats(0.05, 1.0))

    @st.composite
    def vertical_slash(draw):
        vertical, slash = draw(st.integers(0, 300)), draw(st.integers(0, 400))
        return sa.VerticalSlash(vertical=vertical, slash=slash, sink=draw(st.integers(0, vertical)),
                                local=draw(st.integers(0, slash)), last_q=draw(st.integers(1, 100)),
                                gamma=draw(gammas), min_vertical=draw(st.integers(0, vertical)),
                                min_slash=draw(st.integers(0, slash)))

    @st.composite
    def block_sparse(draw):
        top_k, gamma = draw(st.one_of(st.none(), st.integers(1, 12))), draw(gammas)
        return sa.BlockSparse(top_k=top_k, gamma=gamma)

    ashape = st.builds(sa.AShape, sink=st.integers(0, 200), local=st.integers(0, 300))
    return st.one_of(ashape, vertical_slash(), block_sparse(), st.just(sa.Dense()))
