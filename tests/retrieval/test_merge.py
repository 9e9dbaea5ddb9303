"""merge_partials: merging attention over the parts of a random split of the keys equals attention over all."""
from __future__ import annotations

import torch
from hypothesis import given, strategies as st

import sparse_attn as sa
from sparse_attn.backends.merge import merge_partials
from helpers import assert_close, assert_lse_close


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


@given(n=st.integers(1, 600), seed=st.integers(0, 10 ** 6), step=st.sampled_from([1, 96, 700, 1 << 20]),
       transposed=st.booleans())
def test_in_place_merge_equals_merge_partials(n, seed, step, transposed):
    """merge_into (the torch backend's in-place two-part merge) against merge_partials, with empty rows in
    either part and in both, in steps of any size and through a strided view."""
    from sparse_attn.backends.merge import merge_into

    gen = torch.Generator().manual_seed(seed)
    outs = [torch.randn(n, 3, 8, generator=gen) for _ in range(2)]
    lses = [torch.randn(n, 3, generator=gen) * 5 for _ in range(2)]
    for p in range(2):
        empty = torch.rand(n, 3, generator=gen) < 0.3
        lses[p] = lses[p].masked_fill(empty, float("-inf"))
        outs[p] = outs[p].masked_fill(empty[..., None], 0.0)
    ref_out, ref_lse = merge_partials(outs, lses)
    out, lse = outs[0].clone(), lses[0].clone()
    if transposed:                 # the merge writes through views whose first dim is not the outer one
        merge_into(out.transpose(0, 1), lse.transpose(0, 1), outs[1].transpose(0, 1).contiguous(),
                   lses[1].transpose(0, 1).contiguous(), step_bytes=step)
    else:
        merge_into(out, lse, outs[1].clone(), lses[1].clone(), step_bytes=step)
    assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert_close(lse.masked_fill(torch.isinf(lse), 0), ref_lse.masked_fill(torch.isinf(ref_lse), 0), atol=1e-6,
                 rtol=1e-6)
