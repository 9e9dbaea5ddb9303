"""merge_partials: merging attention over the parts of a random split of the keys equals attention over all."""
from __future__ import annotations

import torch
from hypothesis import given, strategies as st

import sparse_attn as sa
from sparse_attn.ops.merge import merge_partials
from conftest import assert_close, assert_lse_close


@given(L=st.integers(1, 70), parts=st.integers(1, 5), Lq=st.integers(1, 4), seed=st.integers(0, 10 ** 6),
       gqa=st.booleans())
def test_merge_of_random_split_equals_union(L, parts, Lq, seed, gqa):
    gen = torch.Generator().manual_seed(seed)
    Hq, Hkv = (4, 2) if gqa else (2, 2)
    Lq = min(Lq, L)
    q = torch.randn(2, Hq, Lq, 32, generator=gen)
    k = torch.randn(2, Hkv, L, 32, generator=gen)
    v = torch.randn(2, Hkv, L, 32, generator=gen)
    owner = torch.randint(0, parts, (2, Hq, Lq, L), generator=gen)        # each key goes to one part, per row
    outs, lses = [], []
    for p in range(parts):
        o, l = sa.reference_attention(q, k, v, mask=owner == p, causal=False, return_lse=True)
        outs.append(o)
        lses.append(l)
    out, lse = merge_partials(outs, lses)
    ref, ref_lse = sa.reference_attention(q, k, v, causal=False, return_lse=True)
    assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert_lse_close(lse, ref_lse, atol=2e-6, rtol=1e-6)


def test_merge_with_empty_parts_keeps_neg_inf():
    out = [torch.zeros(1, 1, 2, 4), torch.ones(1, 1, 2, 4)]
    lse = [torch.full((1, 1, 2), float("-inf")), torch.tensor([[[0.0, float("-inf")]]])]
    o, l = merge_partials(out, lse)
    assert torch.equal(o[0, 0, 0], torch.ones(4)) and torch.equal(o[0, 0, 1], torch.zeros(4))
    assert l[0, 0, 0] == 0 and torch.isneginf(l[0, 0, 1])
