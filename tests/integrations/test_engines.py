"""Engine entry points (`sparse_attn.integrations`): BLHD `sparse_attn_func`, varlen entry points and
`convert_vertical_slash_indexes`, against the BHLD API, the dense oracle and key-by-key brute force."""
import random

import pytest
import torch

import sparse_attn as sa
from sparse_attn.integrations import (convert_vertical_slash_indexes, sparse_attn_func, sparse_attn_varlen_func,
                                      sparse_prefill_varlen)
from helpers import assert_close, assert_lse_close, causal_mask, lse_fp64, make_qkv, random_layout, sdpa

BM = BN = 64
# (Lq, Lk, Hq, Hkv): square, Lq < Lk (chunked prefill), GQA, MQA with a single query
SHAPES = {"sq130": (130, 130, 2, 2), "q70k200_gqa": (70, 200, 4, 2), "q1k65_mqa": (1, 65, 2, 1)}


def ours(lse):
    """The engines' LSE (+inf for a row with no key) in this package's convention (-inf)."""
    return lse.masked_fill(lse == float("inf"), float("-inf"))


def blhd(*ts):
    return [t.transpose(1, 2) for t in ts]


def index_of(layout):
    return layout.block_count, layout.block_offset, layout.column_count, layout.column_index


def full_cover_layout(B, H, q_len, k_len, first=10):
    """Unaligned tiles from ``first`` on plus columns for every key they miss: together they cover every key."""
    n_qb = -(-q_len // BM)
    starts = list(range(first, k_len, BN))
    cols = [c for c in range(k_len) if c < first]
    bc = torch.full((B, H, n_qb), len(starts), dtype=torch.int32)
    bo = torch.tensor(starts, dtype=torch.int32).expand(B, H, n_qb, len(starts)).contiguous()
    cc = torch.full((B, H, n_qb), len(cols), dtype=torch.int32)
    ci = torch.tensor(cols + [0], dtype=torch.int32).expand(B, H, n_qb, len(cols) + 1).contiguous()
    layout = sa.SparseLayout(bc, bo, cc, ci, q_len=q_len, k_len=k_len)
    layout.check()
    assert bool(layout.to_mask().all())
    return layout


# ---------------------------------------------------------------------------------------------------- BLHD
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_func_sparse_layout_matches_bhld_and_oracle(shape, causal):
    Lq, Lk, Hq, Hkv = SHAPES[shape]
    q, k, v = make_qkv(B=2, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=32, seed=3)
    layout, _, _ = random_layout(random.Random(7), 2, Hq, Lq, Lk, BM, BN)
    assert layout.density(causal=causal) < 0.95 or Lq == 1                  # genuinely sparse
    out, lse = sparse_attn_func(*blhd(q, k, v), *index_of(layout), causal=causal, return_softmax_lse=True)
    assert out.shape == (2, Lq, Hq, 32) and out.dtype == q.dtype
    assert lse.shape == (2, Hq, Lq) and lse.dtype == torch.float32
    bhld, bhld_lse = sa.sparse_attention(q, k, v, layout, causal=causal, return_lse=True)
    assert_close(out.transpose(1, 2), bhld, atol=1e-6, rtol=1e-6)
    assert_lse_close(ours(lse), bhld_lse, atol=1e-6, rtol=1e-6)
    ref, ref_lse = sa.reference_attention(q, k, v, layout.to_mask(), causal=causal, return_lse=True)
    assert_close(out.transpose(1, 2), ref, atol=1e-5)
    assert_lse_close(ours(lse), ref_lse, atol=1e-5)
    assert not torch.equal(ref, sdpa(q, k, v, causal=causal))                # the sparsity matters


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_func_full_cover_equals_dense(shape, causal):
    Lq, Lk, Hq, Hkv = SHAPES[shape]
    q, k, v = make_qkv(B=2, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=32, seed=5)
    layout = full_cover_layout(2, Hq, Lq, Lk)
    out, lse = sparse_attn_func(*blhd(q, k, v), *index_of(layout), causal=causal, return_softmax_lse=True)
    assert_close(out.transpose(1, 2), sdpa(q, k, v, causal=causal), atol=1e-5)
    assert_lse_close(ours(lse), lse_fp64(q, k, causal=causal).float(), atol=1e-5)


def test_func_default_is_non_causal_and_scale_is_used():
    q, k, v = make_qkv(B=1, Hq=2, Lq=100, Lk=100, D=32, seed=8)
    layout = full_cover_layout(1, 2, 100, 100)
    out = sparse_attn_func(*blhd(q, k, v), *index_of(layout))               # positional defaults: causal=False
    assert_close(out.transpose(1, 2), sdpa(q, k, v, causal=False), atol=1e-5)
    out = sparse_attn_func(*blhd(q, k, v), *index_of(layout), 0.0, 0.3, True)
    assert_close(out.transpose(1, 2), sdpa(q, k, v, causal=True, scale=0.3), atol=1e-5)


def test_func_out_is_filled_and_checked():
    q, k, v = make_qkv(B=1, Hq=2, Lq=70, Lk=90, D=16, seed=9)
    layout, _, _ = random_layout(random.Random(2), 1, 2, 70, 90, BM, BN)
    expected = sparse_attn_func(*blhd(q, k, v), *index_of(layout), causal=True)
    buf = torch.full((1, 70, 2, 16), float("nan"))
    got, lse = sparse_attn_func(*blhd(q, k, v), *index_of(layout), causal=True, out=buf, return_softmax_lse=True)
    assert got is buf
    assert_close(buf, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="out"):
        sparse_attn_func(*blhd(q, k, v), *index_of(layout), out=torch.empty(1, 2, 70, 16))
    with pytest.raises(ValueError, match="out"):
        sparse_attn_func(*blhd(q, k, v), *index_of(layout), out=torch.empty(1, 70, 2, 16, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,name", [({"dropout_p": 0.1}, "dropout_p"), ({"softcap": -1.0}, "softcap"),
                                         ({"softcap": "30"}, "softcap"),
                                         ({"alibi_slopes": torch.ones(2)}, "alibi_slopes")])
def test_func_unsupported_arguments_raise(kwargs, name):
    q, k, v = make_qkv(B=1, Hq=2, Lq=40, Lk=40, D=16)
    layout = full_cover_layout(1, 2, 40, 40)
    with pytest.raises(ValueError, match=name):
        sparse_attn_func(*blhd(q, k, v), *index_of(layout), **kwargs)


def test_func_accepts_what_upstream_ignores():
    """``deterministic`` and, without dropout, ``return_attn_probs`` change nothing upstream: same result here."""
    q, k, v = make_qkv(B=1, Hq=2, Lq=40, Lk=40, D=16)
    layout, _, _ = random_layout(random.Random(1), 1, 2, 40, 40, BM, BN)
    plain = sparse_attn_func(*blhd(q, k, v), *index_of(layout), return_softmax_lse=True)
    for kwargs in ({"deterministic": True}, {"return_attn_probs": True}):
        got = sparse_attn_func(*blhd(q, k, v), *index_of(layout), return_softmax_lse=True, **kwargs)
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, plain))


def test_func_bad_index_raises():
    q, k, v = make_qkv(B=1, Hq=2, Lq=130, Lk=130, D=16)
    bc, bo, cc, ci = index_of(full_cover_layout(1, 2, 130, 130))
    with pytest.raises(ValueError, match="block_offset must be int32"):
        sparse_attn_func(*blhd(q, k, v), bc, bo.long(), cc, ci)
    with pytest.raises(ValueError, match="column_count"):
        sparse_attn_func(*blhd(q, k, v), bc, bo, cc[:, :1], ci)
    with pytest.raises(ValueError, match="block_count has 2 query blocks"):
        sparse_attn_func(*blhd(q, k, v), bc[:, :, :2], bo, cc, ci)
    with pytest.raises(ValueError, match="q must be 4-d"):
        sparse_attn_func(q[0], k, v, bc, bo, cc, ci)


# ---------------------------------------------------------------------------------------------------- convert
def brute_force_vs_mask(q_len, kv_len, verticals, slashes, bm, bn, causal):
    """Bool [H, q_len, kv_len] written out key by key from the documented rule: per query block, the keys the
    slashes reach (``p - s`` for the rows' positions ``p``), in maximal runs, runs closer than ``bn`` merged, each
    merged run ``[a, e)`` widened to ``[a, a + bn * ceil((e - a) / bn))``; plus every vertical."""
    shift = kv_len - q_len if causal else kv_len              # without causal the queries sit after the last key
    H = len(verticals)
    mask = torch.zeros(H, q_len, kv_len, dtype=torch.bool)
    for h in range(H):
        for m in range(-(-q_len // bm)):
            rows = range(m * bm, min((m + 1) * bm, q_len))
            p0, p1 = rows[0] + shift, rows[-1] + shift
            hi = p1 if causal else kv_len - 1
            keys = sorted({p - s for s in slashes[h] for p in range(p0, p1 + 1) if 0 <= p - s <= hi})
            runs = []
            for j in keys:
                if runs and j - runs[-1][1] < bn:                           # gap (j - end) below bn: merge
                    runs[-1][1] = j + 1
                else:
                    runs.append([j, j + 1])
            listed = set(verticals[h]) & set(range(kv_len))
            for a, e in runs:
                listed.update(range(a, min(a + bn * (-(-(e - a) // bn)), kv_len)))
            for r in rows:
                for j in listed:
                    mask[h, r, j] = True
    return mask


def random_vs_case(rng, kv_len, heads, n_v, n_s):
    verticals, slashes = [], []
    for _ in range(heads):
        v = rng.sample(range(kv_len), n_v)
        s = rng.sample(range(3), 2) + rng.sample(range(3, kv_len + 20), n_s - 2)   # slashes near 0 and beyond
        verticals.append(sorted(v))
        slashes.append(sorted(s, reverse=True))                                  # vLLM's order
    return verticals, slashes


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed,bm,bn", [(0, 64, 64), (1, 64, 64), (2, 32, 16), (3, 16, 32)])
def test_convert_matches_brute_force(seed, bm, bn, causal):
    rng = random.Random(seed)
    lens = [(rng.randint(1, 150), None), (rng.randint(100, 300), None)]
    lens = [(q, rng.randint(q, 300)) for q, _ in lens]
    context, heads = 320, 3
    cases = [random_vs_case(rng, kv, heads, n_v=rng.randint(1, 12), n_s=6) for _, kv in lens]
    n_v = max(len(c[0][0]) for c in cases)
    vert = torch.zeros(2, heads, n_v, dtype=torch.int32)
    for b, (vs, _) in enumerate(cases):
        for h, v in enumerate(vs):                        # pad by repeating the last vertical (duplicates allowed)
            vert[b, h] = torch.tensor(v + [v[-1]] * (n_v - len(v)), dtype=torch.int32)
    slash = torch.tensor([c[1] for c in cases], dtype=torch.int32)
    q_lens = torch.tensor([q for q, _ in lens], dtype=torch.int32)
    kv_lens = torch.tensor([kv for _, kv in lens], dtype=torch.int32)
    bc, bo, cc, ci = convert_vertical_slash_indexes(q_lens, kv_lens, vert, slash, context, bm, bn, causal=causal,
                                                    clip=True)
    n_rows = -(-context // bm)
    assert bc.shape == cc.shape == (2, heads, n_rows) and bo.shape[:3] == ci.shape[:3] == (2, heads, n_rows)
    assert all(t.dtype == torch.int32 for t in (bc, bo, cc, ci))
    n_cols = 0
    for b, (q_len, kv_len) in enumerate(lens):
        n_qb = -(-q_len // bm)
        assert int(bc[b, :, n_qb:].sum()) == 0 and int(cc[b, :, n_qb:].sum()) == 0
        layout = sa.SparseLayout(bc[b:b + 1, :, :n_qb], bo[b:b + 1, :, :n_qb], cc[b:b + 1, :, :n_qb],
                                 ci[b:b + 1, :, :n_qb], q_len=q_len, k_len=kv_len, block_m=bm, block_n=bn)
        layout.check_indices()
        expected = brute_force_vs_mask(q_len, kv_len, *cases[b], bm, bn, causal)
        got = layout.to_mask()[0]
        if causal:
            cm = causal_mask(q_len, kv_len)
            got, expected = got & cm, expected & cm
        assert torch.equal(got, expected), f"batch entry {b}: {int((got ^ expected).sum())} keys differ"
        n_cols += int(cc[b].sum())
    assert n_cols > 0                                      # some verticals stayed columns


def test_convert_vertical_inside_slash_tile_is_not_a_column():
    # one block of 64 queries at the end of 200 keys (positions 136..199); slash 0 covers keys 136..199
    bc, bo, cc, ci = convert_vertical_slash_indexes(
        torch.tensor([64], dtype=torch.int32), torch.tensor([200], dtype=torch.int32),
        torch.tensor([[[3, 150, 199]]], dtype=torch.int32), torch.tensor([[[0]]], dtype=torch.int32), 200, 64, 64,
        clip=True)
    assert bc[0, 0, 0].item() == 1 and bo[0, 0, 0, 0].item() == 136
    assert cc[0, 0, 0].item() == 1 and ci[0, 0, 0, 0].item() == 3


def test_convert_feeds_sparse_attn_func():
    q, k, v = make_qkv(B=1, Hq=2, Hkv=1, Lq=150, Lk=220, D=16, seed=4)
    vert = torch.tensor([[[0, 5, 100]], [[7, 8, 219]]], dtype=torch.int32).reshape(1, 2, 3)
    slash = torch.tensor([[[90, 1, 0]], [[200, 64, 2]]], dtype=torch.int32).reshape(1, 2, 3)
    idx = convert_vertical_slash_indexes(torch.tensor([150], dtype=torch.int32), torch.tensor([220], dtype=torch.int32),
                                         vert, slash, 256, 64, 64, clip=True)
    assert idx[0].shape[2] == 4                                              # ceil(256 / 64) rows; 3 are used
    out = sparse_attn_func(*blhd(q, k, v), *idx, causal=True)
    mask = torch.stack([brute_force_vs_mask(150, 220, [vert[0, h].tolist()], [slash[0, h].tolist()], 64, 64, True)[0]
                        for h in range(2)])[None]
    assert_close(out.transpose(1, 2), sa.reference_attention(q, k, v, mask, causal=True), atol=1e-5)


def test_convert_bad_input_raises():
    ok = dict(q_seqlens=torch.tensor([10], dtype=torch.int32), kv_seqlens=torch.tensor([10], dtype=torch.int32),
              vertical_indexes=torch.zeros(1, 1, 2, dtype=torch.int32),
              slash_indexes=torch.zeros(1, 1, 2, dtype=torch.int32), context_size=10, block_size_M=64,
              block_size_N=64)
    for name, bad in (("q_seqlens", torch.tensor([10.0])), ("vertical_indexes", torch.zeros(1, 2, dtype=torch.int32)),
                      ("slash_indexes", torch.zeros(2, 1, 2, dtype=torch.int32)), ("block_size_N", 0),
                      ("kv_seqlens", torch.tensor([5], dtype=torch.int32)), ("context_size", 0)):
        with pytest.raises(ValueError, match=name):
            convert_vertical_slash_indexes(**{**ok, name: bad})


# ---------------------------------------------------------------------------------------------------- varlen
Q_LENS, K_LENS = (70, 1, 130), (70, 65, 200)


def packed(Hq=4, Hkv=2, D=16, seed=11):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(Q_LENS), Hq, D, generator=gen)
    k = torch.randn(sum(K_LENS), Hkv, D, generator=gen)
    v = torch.randn(sum(K_LENS), Hkv, D, generator=gen)
    cu_q = torch.tensor([0, 70, 71, 201], dtype=torch.int32)
    cu_k = torch.tensor([0, 70, 135, 335], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def seq(t, cu, i):
    return t[cu[i]:cu[i + 1]].unsqueeze(0)                  # [1, L, H, D] (BLHD)


def block_diagonal_mask(causal):
    """Bool [total_q, total_k]: sequence i's queries (its last positions) see its keys only."""
    mask = torch.zeros(sum(Q_LENS), sum(K_LENS), dtype=torch.bool)
    q0 = k0 = 0
    for lq, lk in zip(Q_LENS, K_LENS):
        mask[q0:q0 + lq, k0:k0 + lk] = causal_mask(lq, lk) if causal else True
        q0, k0 = q0 + lq, k0 + lk
    return mask


def stack_layouts(layouts, n_qb):
    """One index entry per sequence (batch-1 layouts), padded to ``n_qb`` query blocks and the widest entry."""
    pad = torch.nn.functional.pad
    nb = max(l.block_offset.shape[-1] for l in layouts)
    nc = max(l.column_index.shape[-1] for l in layouts)
    return (torch.cat([pad(l.block_count, (0, n_qb - l.num_query_blocks)) for l in layouts]),
            torch.cat([pad(l.block_offset, (0, nb - l.block_offset.shape[-1], 0, n_qb - l.num_query_blocks))
                       for l in layouts]),
            torch.cat([pad(l.column_count, (0, n_qb - l.num_query_blocks)) for l in layouts]),
            torch.cat([pad(l.column_index, (0, nc - l.column_index.shape[-1], 0, n_qb - l.num_query_blocks))
                       for l in layouts]))


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_func_equals_one_by_one(causal):
    q, k, v, cu_q, cu_k = packed()
    rng = random.Random(3)
    layouts = [random_layout(rng, 1, 4, lq, lk, BM, BN, junk_padding=False)[0] for lq, lk in zip(Q_LENS, K_LENS)]
    bc, bo, cc, ci = stack_layouts(layouts, n_qb=3)                          # ceil(130 / 64) rows
    out, lse = sparse_attn_varlen_func(q, k, v, bc, bo, cc, ci, cu_q, cu_k, 130, 200, causal=causal,
                                       return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (4, sum(Q_LENS))
    for i, layout in enumerate(layouts):
        o, l = sparse_attn_func(seq(q, cu_q, i), seq(k, cu_k, i), seq(v, cu_k, i), *index_of(layout), causal=causal,
                                return_softmax_lse=True)
        assert_close(out[cu_q[i]:cu_q[i + 1]], o[0], atol=1e-6, rtol=1e-6, what=f"sequence {i}")
        assert_lse_close(ours(lse[:, cu_q[i]:cu_q[i + 1]]), ours(l[0]), atol=1e-6, rtol=1e-6)
    # full-cover indexes: the varlen result is block-diagonal dense attention
    full = [full_cover_layout(1, 4, lq, lk) for lq, lk in zip(Q_LENS, K_LENS)]
    idx = stack_layouts(full, n_qb=3)
    out = sparse_attn_varlen_func(q, k, v, *idx, cu_q, cu_k, 130, 200, causal=causal)
    ref = sa.reference_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_diagonal_mask(causal),
                                 causal=False)
    assert_close(out, ref[0].transpose(0, 1), atol=1e-5)


def test_prefill_varlen_equals_one_by_one_sparse():
    q, k, v, cu_q, cu_k = packed(seed=12)
    pattern = sa.VerticalSlash(vertical=16, slash=64, sink=4, local=32, last_q=16)
    out = sparse_prefill_varlen(q, k, v, cu_q, cu_k, 130, 200, pattern, dense_below=0)
    for i in range(3):
        qi, ki, vi = (seq(t, cu, i).transpose(1, 2) for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k)))
        expected = sa.sparse_prefill(qi, ki, vi, pattern, dense_below=0)
        assert_close(out[cu_q[i]:cu_q[i + 1]], expected[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    dense = sparse_prefill_varlen(q, k, v, cu_q, cu_k, 130, 200, sa.Dense())
    assert not torch.allclose(out, dense, atol=1e-3)                          # the pattern was sparse


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_varlen_no_leakage(causal):
    q, k, v, cu_q, cu_k = packed(seed=13)
    ref = sa.reference_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_diagonal_mask(causal),
                                 causal=False)[0].transpose(0, 1)
    out = sparse_prefill_varlen(q, k, v, cu_q, cu_k, 130, 200, causal=causal)   # default pattern (dense when short)
    assert_close(out, ref, atol=1e-5)
    # enormous keys and values in sequences 1 and 2 must not change sequence 0
    k2, v2 = k.clone(), v.clone()
    k2[70:], v2[70:] = 1e4, 1e4
    out2 = sparse_prefill_varlen(q, k2, v2, cu_q, cu_k, 130, 200, sa.AShape(sink=8, local=32), causal=causal,
                                 dense_below=0)
    expected = sparse_prefill_varlen(q[:70], k[:70], v[:70], cu_q[:2], cu_k[:2], 70, 70, sa.AShape(sink=8, local=32),
                                     causal=causal, dense_below=0)
    assert_close(out2[:70], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(cu_q=[0, 71, 70, 201]), "cu_seqlens_q must be non-decreasing"),
    (dict(cu_q=[0, 70, 71, 200]), "cu_seqlens_q must end at the packed length 201"),
    (dict(cu_k=[1, 70, 135, 335]), "cu_seqlens_k must start at 0"),
    (dict(dtype=torch.int64), "cu_seqlens_q must be a non-empty 1-d int32"),
    (dict(max_q=100), "max_seqlen_q"),
    (dict(max_k=199), "max_seqlen_k"),
    (dict(cu_k=[0, 65, 135, 335]), "more queries than keys"),
    (dict(cu_k=[0, 70, 335], max_k=265), "same number of sequences"),
])
def test_varlen_bad_cu_seqlens(change, match):
    q, k, v, cu_q, cu_k = packed()
    dtype = change.get("dtype", torch.int32)
    cu_q = torch.tensor(change.get("cu_q", cu_q.tolist()), dtype=dtype)
    cu_k = torch.tensor(change.get("cu_k", cu_k.tolist()), dtype=torch.int32)
    args = (q, k, v, cu_q, cu_k, change.get("max_q", 130), change.get("max_k", 200))
    with pytest.raises(ValueError, match=match):
        sparse_prefill_varlen(*args)
    idx = index_of(full_cover_layout(3, 4, 130, 200))
    with pytest.raises(ValueError, match=match):
        sparse_attn_varlen_func(*args[:3], *idx, *args[3:])


def test_varlen_bad_index_raises():
    q, k, v, cu_q, cu_k = packed()
    bc, bo, cc, ci = index_of(full_cover_layout(3, 4, 130, 200))
    with pytest.raises(ValueError, match="column_index must be int32"):
        sparse_attn_varlen_func(q, k, v, bc, bo, cc, ci.long(), cu_q, cu_k, 130, 200)
    with pytest.raises(ValueError, match="block_count must have leading shape"):
        sparse_attn_varlen_func(q, k, v, bc[:2], bo, cc, ci, cu_q, cu_k, 130, 200)
    with pytest.raises(ValueError, match="block_offset has 2 query blocks"):
        sparse_attn_varlen_func(q, k, v, bc, bo[:, :, :2], cc, ci, cu_q, cu_k, 130, 200)
    with pytest.raises(ValueError, match="dropout_p"):
        sparse_attn_varlen_func(q, k, v, bc, bo, cc, ci, cu_q, cu_k, 130, 200, 0.5)
    with pytest.raises(ValueError, match="q must be 3-d"):
        sparse_prefill_varlen(q[None], k, v, cu_q, cu_k, 130, 200)


def test_docs_example_runs():
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "engines.md")
    with open(path) as f:
        code = re.findall(r"```python\n(.*?)```", f.read(), re.S)[-1]
    assert "sparse_attn_varlen_func" in code and "convert_vertical_slash_indexes" in code
    exec(compile(code, "docs/engines.md", "exec"), {})


def test_empty_inputs():
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)                       # noqa: E731
    # no slashes: verticals only, as columns
    bc, bo, cc, ci = convert_vertical_slash_indexes(i32([70]), i32([90]), i32([[[5, 85]]]),
                                                    torch.zeros(1, 1, 0, dtype=torch.int32), 90, 64, 64)
    assert bc.sum() == 0 and cc[0, 0].tolist() == [1, 2]           # 85 is after block 0's last row (83)
    assert ci[0, 0, 1].tolist() == [5, 85]
    # no verticals: slashes only
    bc, bo, cc, ci = convert_vertical_slash_indexes(i32([70]), i32([90]), torch.zeros(1, 1, 0, dtype=torch.int32),
                                                    i32([[[0]]]), 90, 64, 64)
    assert cc.sum() == 0 and ci.shape[-1] == 0 and bc[0, 0].tolist() == [1, 1]
    # no queries
    q, k, v = torch.randn(1, 0, 2, 16), torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 16)
    z3, z4 = torch.zeros(1, 2, 0, dtype=torch.int32), torch.zeros(1, 2, 0, 1, dtype=torch.int32)
    out, lse = sparse_attn_func(q, k, v, z3, z4, z3, z4, return_softmax_lse=True)
    assert out.shape == (1, 0, 2, 16) and lse.shape == (1, 2, 0)


def test_row_without_keys_gives_zero_and_lse_plus_inf():
    """flash-attention's convention for a row that sees no key (the package's own API says -inf)."""
    q, k, v = make_qkv(B=1, Hq=2, Lq=70, Lk=90, D=16, seed=14)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)                       # noqa: E731
    # head 0 row block 0 lists nothing; head 1 lists key 3 only, which causal rows 0..19 (positions 20..39) see
    bc, cc = i32([[[0, 1], [0, 1]]]), i32([[[0, 0], [1, 0]]])
    bo, ci = i32([[[[0], [10]], [[0], [10]]]]), i32([[[[0], [0]], [[3], [0]]]])
    out, lse = sparse_attn_func(*blhd(q, k, v), bc, bo, cc, ci, causal=True, return_softmax_lse=True)
    assert torch.isposinf(lse[0, 0, :64]).all() and (out[0, :64, 0] == 0).all()
    assert torch.isfinite(lse[0, 1, :64]).all() and torch.isfinite(lse[0, :, 64:]).all()
    assert_close(out[0, :64, 1], v[0, 1, 3].expand(64, 16), atol=1e-6)          # one key: its value
    vout, vlse = sparse_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), bc, bo,
                                         cc, ci, i32([0, 70]), i32([0, 90]), 70, 90, causal=True,
                                         return_softmax_lse=True)
    assert torch.equal(vlse, lse[0]) and torch.equal(vout, out[0])
