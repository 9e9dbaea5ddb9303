"""`convert_vertical_slash_indexes` / `_mergehead` return the engines' tensors: the vectorised conversion against the
per-block walk (`engine_convert_walk`), hand-worked cases of each rule, and the argument checks."""
import random

import pytest
import torch

from sparse_attn.integrations import convert_vertical_slash_indexes, convert_vertical_slash_indexes_mergehead
from sparse_attn.integrations.vertical_slash_engine import engine_convert_walk

I32_MAX, I32_MIN = torch.iinfo(torch.int32).max, torch.iinfo(torch.int32).min


def i32(x):
    return torch.tensor(x, dtype=torch.int32)


def row(result, b, h, m):
    """(tiles, columns) of one query block, cut to their counts."""
    bc, bo, cc, ci = result
    return bo[b, h, m, :bc[b, h, m]].tolist(), ci[b, h, m, :cc[b, h, m]].tolist()


def random_case(rng, q_len, kv_len, heads, n_v, n_s):
    """Per head: sorted verticals (some past the keys, some repeated) and descending slashes (some negative, some
    past every position)."""
    verticals, slashes = [], []
    for _ in range(heads):
        v = sorted(rng.choice([rng.randint(-2, kv_len + 80), rng.randint(0, kv_len - 1)]) for _ in range(n_v))
        s = sorted((rng.randint(-3, kv_len + q_len + 100) for _ in range(n_s)), reverse=True)
        verticals.append(v)
        slashes.append(s)
    return verticals, slashes


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bm,bn", [(64, 64), (16, 16), (32, 8), (8, 32), (2, 2)])
def test_convert_equals_walk(bm, bn, causal):
    rng = random.Random(bm * 100 + bn + causal)
    for _ in range(12):
        lens = [(q, rng.randint(q, q + 150)) for q in (rng.randint(1, 200), rng.randint(1, 200))]
        heads, n_v, n_s = 3, rng.randint(1, 12), rng.randint(1, 9)
        cases = [random_case(rng, q, kv, heads, n_v, n_s) for q, kv in lens]
        context = rng.randint(max(q for q, _ in lens), 260)          # may be below kv_len: only sizes the rows
        result = convert_vertical_slash_indexes(i32([q for q, _ in lens]), i32([kv for _, kv in lens]),
                                                i32([c[0] for c in cases]), i32([c[1] for c in cases]), context,
                                                bm, bn, causal=causal)
        n_rows = -(-context // bm)
        assert result[0].shape == (2, heads, n_rows) and result[1].shape[-1] == n_s * max(1, -(-bm // bn))
        assert result[3].shape == (2, heads, n_rows, n_v) and all(t.dtype == torch.int32 for t in result)
        for b, (q_len, kv_len) in enumerate(lens):
            n_qb = -(-q_len // bm)
            for h in range(heads):
                for m in range(n_rows):
                    expected = engine_convert_walk(q_len, kv_len, m, cases[b][0][h], cases[b][1][h], bm, bn,
                                                   causal) if m < n_qb else ([], [])
                    assert row(result, b, h, m) == expected, (b, h, m, q_len, kv_len, cases[b][0][h],
                                                              cases[b][1][h])


@pytest.mark.parametrize("causal", [True, False])
def test_mergehead_uses_each_heads_count(causal):
    """Padded buffers (int32 max / min, as SGLang's dual-chunk backend fills them) with per-head counts: each head as
    if only its first entries existed."""
    rng = random.Random(5 + causal)
    q_len, kv_len, heads, n_v, n_s = 150, 300, 4, 10, 7
    verticals, slashes = random_case(rng, q_len, kv_len, heads, n_v, n_s)
    v_counts, s_counts = [10, 3, 1, 6], [7, 1, 4, 2]
    vbuf = i32([[v[:n] + [I32_MAX] * (n_v - n) for v, n in zip(verticals, v_counts)]])
    sbuf = i32([[s[:n] + [I32_MIN] * (n_s - n) for s, n in zip(slashes, s_counts)]])
    result = convert_vertical_slash_indexes_mergehead(i32([q_len]), i32([kv_len]), vbuf, sbuf, i32(v_counts),
                                                      i32(s_counts), q_len, 64, 64, causal=causal)
    assert result[1].shape[-1] == n_s and result[3].shape[-1] == n_v
    for h in range(heads):
        one = convert_vertical_slash_indexes(i32([q_len]), i32([kv_len]), i32([[verticals[h][:v_counts[h]]]]),
                                             i32([[slashes[h][:s_counts[h]]]]), q_len, 64, 64, causal=causal)
        for m in range(3):
            assert row(result, 0, h, m) == row(one, 0, 0, m)
            assert row(result, 0, h, m) == engine_convert_walk(q_len, kv_len, m, verticals[h][:v_counts[h]],
                                                               slashes[h][:s_counts[h]], 64, 64, causal)
    # clip=True honours the counts too (a head with no slash at all included)
    s_counts[3] = 0
    clipped = convert_vertical_slash_indexes_mergehead(i32([q_len]), i32([kv_len]), vbuf, sbuf, i32(v_counts),
                                                       i32(s_counts), q_len, 64, 64, causal=causal, clip=True)
    for h in range(heads):
        one = convert_vertical_slash_indexes(i32([q_len]), i32([kv_len]), i32([[verticals[h][:v_counts[h]]]]),
                                             i32([[slashes[h][:s_counts[h]] or [10 ** 6]]]), q_len, 64, 64,
                                             causal=causal, clip=True)
        for m in range(3):
            assert row(clipped, 0, h, m) == row(one, 0, 0, m)
    # the same buffers without counts would read the padding: not the same index
    plain = convert_vertical_slash_indexes(i32([q_len]), i32([kv_len]), vbuf, sbuf, q_len, 64, 64, causal=causal)
    assert not all(torch.equal(a, b) for a, b in zip(plain, result))


# ---------------------------------------------------------------------------------------------------- the rules
def test_causal_rules_by_hand():
    # 64 queries at the end of 200 keys: positions 136..199, E = 200.
    # slash 10 -> chunk [126, 190); slash 100 -> [36, 100); slash 300 is past every position (skipped).
    # chunks [36, 100) and [126, 190) are more than 64 apart: two groups, tiles at 36 and 126.
    # verticals: 5 (before the first group: column), 50 (inside: covered), 110 (between groups: column),
    # 195 (past the last group's end, 190: dropped with causal although position 199 may see it).
    result = convert_vertical_slash_indexes(i32([64]), i32([200]), i32([[[5, 50, 110, 195]]]),
                                            i32([[[300, 100, 10]]]), 64, 64, 64)
    assert row(result, 0, 0, 0) == ([36, 126], [5, 110])


def test_chunks_near_key_zero_are_clamped_and_ranges_grow_by_block_m():
    # 128 queries over 128 keys, block 0 (E = 64): slashes 40 and 20 give chunks ending at max(24, 64) and
    # max(44, 64): both [0, 64).  Block 1 (E = 128): slash 40 -> [24, 88), slash 20 -> ends at 108, within 64 of
    # 88: the group grows by exactly 64 to [24, 152), tiles 24 and 88 (the second reaches past key 127).
    result = convert_vertical_slash_indexes(i32([128]), i32([128]), i32([[[3]]]), i32([[[40, 20]]]), 128, 64, 64)
    assert row(result, 0, 0, 0) == ([0], [])
    assert row(result, 0, 0, 1) == ([24, 88], [3])


def test_non_causal_queries_sit_after_the_last_key():
    # 64 queries, 100 keys, no causal mask: row i sits at 100 + i, E = 164.  Slash 56 -> chunk [44, 108) (tile 44
    # only: 108 is past the keys); vertical 10 is a column, 99 is inside the group.  With bottom-right positions
    # (36 + i) the same slash would reach keys -20..43 instead.
    result = convert_vertical_slash_indexes(i32([64]), i32([100]), i32([[[10, 99]]]), i32([[[56]]]), 64, 64, 64,
                                            causal=False)
    assert row(result, 0, 0, 0) == ([44], [10])
    # slash 120 reaches keys -20..43: its chunk is clamped to [0, 64), covering 10; 99 stays a column
    result = convert_vertical_slash_indexes(i32([64]), i32([100]), i32([[[10, 99]]]), i32([[[120]]]), 64, 64, 64,
                                            causal=False)
    assert row(result, 0, 0, 0) == ([0], [99])
    # no usable slash (all past every position): every vertical inside the keys is a column, no tile
    result = convert_vertical_slash_indexes(i32([64]), i32([100]), i32([[[10, 99, 150]]]), i32([[[500]]]), 64, 64,
                                            64, causal=False)
    assert row(result, 0, 0, 0) == ([], [10, 99])


def test_context_size_only_sizes_rows_and_single_q_seqlen_broadcasts():
    # kv_len (512) above context_size (164): accepted (SGLang's dual-chunk "succ" stage passes context = q_len)
    vert, slash = i32([[[0, 7]], [[3, 9]]]), i32([[[400, 5]], [[300, 2]]])
    result = convert_vertical_slash_indexes(i32([164]), i32([512, 512]), vert, slash, 164, 64, 64, causal=False)
    assert result[0].shape == (2, 1, 3)
    for b in range(2):
        for m in range(3):
            assert row(result, b, 0, m) == engine_convert_walk(164, 512, m, vert[b, 0].tolist(),
                                                               slash[b, 0].tolist(), 64, 64, False)


def test_clip_keeps_the_package_index():
    """clip=True: exact keys of each slash (here slash 0 of a 64-row block at the end of 200 keys: [136, 200))."""
    result = convert_vertical_slash_indexes(i32([64]), i32([200]), i32([[[3, 150, 199]]]), i32([[[0]]]), 200, 64,
                                            64, clip=True)
    assert row(result, 0, 0, 0) == ([136], [3])
    engine = convert_vertical_slash_indexes(i32([64]), i32([200]), i32([[[3, 150, 199]]]), i32([[[0]]]), 200, 64, 64)
    assert row(engine, 0, 0, 0) == ([136], [3])                 # the same here; they differ on the cases above
    # the causal case above (context_size 64 < kv_len 200): the engines drop vertical 195; ours merges the slash
    # ranges [36, 100) and [126, 190) (26 keys apart) into tiles 36, 100, 164, which hold 110 and 195
    args = (i32([64]), i32([200]), i32([[[5, 50, 110, 195]]]), i32([[[300, 100, 10]]]), 64, 64, 64)
    assert row(convert_vertical_slash_indexes(*args, clip=True), 0, 0, 0) == ([36, 100, 164], [5])


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises():
    ok = dict(q_seqlens=i32([10]), kv_seqlens=i32([10]), vertical_indexes=i32([[[1, 2]]]),
              slash_indexes=i32([[[2, 1]]]), context_size=10, block_size_M=64, block_size_N=64)
    for name, bad in (("q_seqlens", torch.tensor([10.0])), ("vertical_indexes", i32([[1, 2]])),
                      ("slash_indexes", i32([[[2, 1]], [[2, 1]]])), ("block_size_N", 0), ("context_size", 0),
                      ("kv_seqlens", i32([5])), ("q_seqlens", i32([10, 10, 10]))):
        with pytest.raises(ValueError, match=name):
            convert_vertical_slash_indexes(**{**ok, name: bad})
    for name, bad in (("vertical_indices_count", i32([3])), ("slash_indices_count", i32([1, 1])),
                      ("vertical_indices_count", [2])):
        counts = dict(vertical_indices_count=i32([2]), slash_indices_count=i32([2]))
        with pytest.raises(ValueError, match=name):
            convert_vertical_slash_indexes_mergehead(**ok, **{**counts, name: bad})


@pytest.mark.parametrize("causal", [True, False])
def test_unsorted_indexes_give_the_engines_walk(causal):
    """The engines walk the entries in the given order; unsorted input takes the walk for every block."""
    rng = random.Random(9 + causal)
    q_len, kv_len, heads = 150, 260, 3
    verticals, slashes = random_case(rng, q_len, kv_len, heads, 8, 6)
    for v, s in zip(verticals, slashes):
        rng.shuffle(v)
        rng.shuffle(s)
    result = convert_vertical_slash_indexes(i32([q_len]), i32([kv_len]), i32([verticals]), i32([slashes]), q_len,
                                            64, 64, causal=causal)
    for h in range(heads):
        for m in range(3):
            assert row(result, 0, h, m) == engine_convert_walk(q_len, kv_len, m, verticals[h], slashes[h], 64, 64,
                                                               causal)
    srt = convert_vertical_slash_indexes(i32([q_len]), i32([kv_len]), i32([[sorted(v) for v in verticals]]),
                                         i32([[sorted(s, reverse=True) for s in slashes]]), q_len, 64, 64,
                                         causal=causal)
    assert not all(torch.equal(a, b) for a, b in zip(srt, result))       # the order matters, as upstream
