"""Estimators: every pattern's layout is valid, keeps what the pattern promises, stays within its budget, and
does not mix batch rows or heads."""
import pytest
import torch
from hypothesis import given, strategies as st

import sparse_attn as sa
from helpers import causal_mask, make_qkv, pattern_cases, pattern_strategy, per_head_mix, resolve_pattern

SHAPES = [(1, 1), (63, 63), (65, 65), (113, 113), (1000, 1000), (65, 300), (1, 130)]
PATTERN_NAMES = list(pattern_cases())


def _visible(lq, lk, causal):
    return causal_mask(lq, lk) if causal else torch.ones(lq, lk, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------- validity
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk", SHAPES)
@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_estimate_gives_a_valid_layout(name, lq, lk, causal):
    hq, hkv = (4, 2) if lq % 2 else (4, 1)
    q, k, _ = make_qkv(2, hq, hkv, lq, lk, 64, seed=lq + 3 * lk, contiguity="blhd", structured=True)
    layout = sa.estimate(q, k, resolve_pattern(name, hq), causal=causal)
    assert isinstance(layout, sa.SparseLayout)
    layout.check()
    assert (layout.batch, layout.heads, layout.q_len, layout.k_len) == (2, hq, lq, lk)
    assert layout.num_query_blocks == -(-lq // 64)
    for name_ in ("block_count", "block_offset", "column_count", "column_index"):
        assert getattr(layout, name_).dtype == torch.int32
    d = layout.density(causal)
    assert 0 < d <= 1 + 1e-12
    if lq == 1000 and name != "dense":
        assert d < 0.9, f"{name} at L=1000 should be sparse, density {d}"


@given(st.data())
def test_random_patterns_give_valid_deterministic_layouts(data):
    hkv, group = data.draw(st.integers(1, 2), "hkv"), data.draw(st.integers(1, 3), "group")
    hq = hkv * group
    per_head = data.draw(st.booleans(), "per_head")
    if per_head:
        pattern = [data.draw(pattern_strategy(), f"pattern {h}") for h in range(hq)]
    else:
        pattern = data.draw(pattern_strategy(), "pattern")
    lq = data.draw(st.integers(1, 300), "lq")
    lk = lq + data.draw(st.sampled_from([0, 1, 70, 250]), "extra")
    block_m, block_n = data.draw(st.sampled_from([(64, 64), (32, 32), (16, 64), (64, 128)]), "blocks")
    causal = data.draw(st.booleans(), "causal")
    q, k, _ = make_qkv(2, hq, hkv, lq, lk, 32, seed=lq + lk, structured=data.draw(st.booleans(), "structured"))
    layout = sa.estimate(q, k, pattern, causal=causal, block_m=block_m, block_n=block_n).check()
    assert (layout.batch, layout.heads, layout.q_len, layout.k_len) == (2, hq, lq, lk)
    assert 0.0 <= layout.density(causal) <= 1.0 + 1e-12
    again = sa.estimate(q, k, pattern, causal=causal, block_m=block_m, block_n=block_n)
    assert torch.equal(layout.to_mask(), again.to_mask())


@pytest.mark.parametrize("block_m,block_n", [(16, 64), (32, 32), (128, 128), (128, 64), (32, 16)])
@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_estimate_with_other_block_sizes(name, block_m, block_n):
    q, k, _ = make_qkv(2, 4, 2, 150, 310, 64, seed=7)
    layout = sa.estimate(q, k, resolve_pattern(name, 4), block_m=block_m, block_n=block_n).check()
    assert (layout.block_m, layout.block_n) == (block_m, block_n)
    assert layout.num_query_blocks == -(-150 // block_m)
    # every causal row sees at least its own key with these patterns (the diagonal is always kept)
    assert (layout.to_mask() & torch.eye(310, dtype=torch.bool)[-150:]).any(-1).all()


# ---------------------------------------------------------------------------------------------------- A-shape
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,sink,local", [(1000, 1000, 8, 64), (1000, 1000, 100, 130), (65, 300, 4, 1),
                                              (113, 113, 0, 50), (200, 700, 130, 0)])
def test_ashape_keeps_sink_and_window_and_little_else(lq, lk, sink, local, causal):
    q, k, _ = make_qkv(1, 2, 1, lq, lk, 32, seed=1)
    layout = sa.estimate(q, k, sa.AShape(sink=sink, local=local), causal=causal).check()
    mask = layout.to_mask()[0, 0]
    keys = torch.arange(lk)[None, :]
    pos = torch.arange(lq)[:, None] + lk - lq
    required = (keys < sink) | ((keys > pos - local) & (keys <= pos))
    assert (mask | ~required).all(), "a sink or local-window key is missing"
    # widened to the query block and rounded to tiles: nothing beyond one tile width past each range
    first = (torch.arange(lq) // 64 * 64)[:, None] + lk - lq
    last = torch.clamp(first + 63, max=lk - 1)
    allowed = (keys < sink + 63) | ((keys > first - local) & (keys < last + 64))
    if sink == 0:
        allowed = (keys > first - local) & (keys < last + 64)
    if local == 0:
        allowed = keys < sink + 63
    assert not (mask & ~allowed).any(), "A-shape lists keys far from its sink and window"
    assert layout.column_count.sum() == 0


def test_ashape_empty_budget_lists_nothing():
    q, k, _ = make_qkv(1, 2, 2, 100, 100, 32)
    layout = sa.estimate(q, k, sa.AShape(sink=0, local=0)).check()
    assert not layout.to_mask().any() and layout.density() == 0.0


# ---------------------------------------------------------------------------------------------------- vertical-slash
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk", [(1000, 1000), (65, 300), (113, 113)])
def test_vertical_slash_keeps_sink_local_and_respects_budgets(lq, lk, causal):
    p = sa.VerticalSlash(vertical=24, slash=128, sink=8, local=70)
    q, k, _ = make_qkv(2, 4, 2, lq, lk, 64, seed=lq, structured=True)
    layout = sa.estimate(q, k, p, causal=causal).check()
    mask = layout.to_mask()
    keys = torch.arange(lk)[None, :]
    pos = torch.arange(lq)[:, None] + lk - lq
    required = (keys < p.sink) | ((pos - keys >= 0) & (pos - keys < p.local))
    if causal:
        required &= keys <= pos
    assert (mask | ~required).all()
    assert int(layout.column_count.max()) <= p.vertical
    n_groups = -(-p.slash // 64)
    # each diagonal group of one query block spans block_m + block_n - 1 keys: at most 2 tiles
    assert int(layout.block_count.max()) <= 2 * n_groups
    if lq == 1000:
        assert layout.density(causal) < 0.5


def _heavy_columns(k, q, n):
    """The n key columns with the most attention from the last 64 queries (per batch row and KV head)."""
    g = q.shape[1] // k.shape[1]
    s = q[:, :, -64:].float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2])[-64:], float("-inf"))
    return s.softmax(-1).sum(-2).topk(n, dim=-1).indices        # [B, Hq, n]


def test_vertical_slash_finds_heavy_columns_per_batch_row():
    q, k, _ = make_qkv(2, 2, 2, 1000, 1000, 64, seed=3, structured=True)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=64, slash=128, sink=8, local=64))
    heavy = _heavy_columns(k, q, 10)
    last_rows = layout.to_mask()[:, :, -1]                        # the last query sees every kept column
    assert last_rows.gather(-1, heavy).all(), "a top-attended column of the sample is missing"
    assert not torch.equal(layout.to_mask()[0], layout.to_mask()[1]), "batch rows should get different layouts"


@pytest.mark.parametrize("gamma", [0.8, 0.95])
@pytest.mark.parametrize("structured", [False, True])
def test_vertical_slash_gamma_reaches_gamma_on_the_sample_rows(gamma, structured):
    lq = 1000
    q, k, _ = make_qkv(2, 2, 1, lq, lq, 64, seed=5, structured=structured)
    p = sa.VerticalSlash(vertical=lq, slash=1024, gamma=gamma, sink=8, local=64, last_q=64)
    layout = sa.estimate(q, k, p)
    g = 2
    s = q[:, :, -64:] @ k.repeat_interleave(g, 1).transpose(-1, -2) / 8
    probs = s.masked_fill(~causal_mask(lq, lq)[-64:], float("-inf")).softmax(-1)
    recall = (probs * layout.to_mask()[:, :, -64:]).sum(-1).mean(-1)     # [B, H]
    assert layout.density() < 0.99
    assert (recall >= gamma - 5e-3).all(), f"recall {recall.min().item():.3f} < gamma {gamma}"


@pytest.mark.parametrize("scoring", ["antidiagonal", "mean"])
def test_block_sparse_gamma_is_monotone(scoring):
    q, k, _ = make_qkv(2, 4, 2, 700, 700, 64, seed=8, structured=True)
    pats = [sa.BlockSparse(top_k=8, gamma=g, scoring=scoring) for g in (0.3, 0.6, 0.9)]
    pats.append(sa.BlockSparse(top_k=8, scoring=scoring))
    masks = [sa.estimate(q, k, p).to_mask() for p in pats]
    for small, big in zip(masks, masks[1:]):
        assert (big | ~small).all(), "a larger gamma (or the top_k cap alone) must keep at least the same blocks"
    assert masks[0].sum() < masks[-1].sum(), "gamma should make a difference here"


def test_vertical_slash_gamma_grows_with_gamma():
    # tiles may shift when diagonal groups merge, so compare sizes rather than key sets
    q, k, _ = make_qkv(2, 4, 2, 700, 700, 64, seed=8, structured=True)
    pats = [sa.VerticalSlash(vertical=200, slash=512, gamma=g, sink=8, local=64, min_vertical=0, min_slash=0)
            for g in (0.3, 0.6, 0.9)]
    pats.append(sa.VerticalSlash(vertical=200, slash=512, sink=8, local=64))
    dens = [sa.estimate(q, k, p).density() for p in pats]
    assert dens[0] < dens[1] < dens[2] <= dens[3] + 1e-3, dens


@pytest.mark.parametrize("block_m,block_n", [(128, 64), (64, 32), (32, 16)])
def test_vertical_slash_keeps_local_diagonals_when_block_m_exceeds_block_n(block_m, block_n):
    p = sa.VerticalSlash(vertical=32, slash=128, sink=8, local=64)
    q, k, _ = make_qkv(2, 4, 2, 1000, 1000, 64, seed=7, structured=True)
    layout = sa.estimate(q, k, p, block_m=block_m, block_n=block_n).check()
    pos = torch.arange(1000)[:, None]
    keys = torch.arange(1000)[None, :]
    required = (keys < p.sink) | ((pos - keys >= 0) & (pos - keys < p.local))
    missing = required & ~layout.to_mask()
    assert not missing.any(), f"{int(missing.sum())} sink/local keys missing"


# ---------------------------------------------------------------------------------------------------- block-sparse
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,top_k", [(1000, 1000, 3), (1000, 1000, 5), (65, 300, 3), (300, 300, 4),
                                         (113, 113, 2), (65, 300, 1), (300, 300, 1)])
def test_block_sparse_top_k(lq, lk, top_k, causal):
    q, k, _ = make_qkv(2, 4, 2, lq, lk, 64, seed=lk + top_k)
    layout = sa.estimate(q, k, sa.BlockSparse(top_k=top_k), causal=causal).check()
    assert layout.is_block_aligned()
    blocks = layout.to_block_mask()
    n_qb, n_kb = blocks.shape[2:]
    first = torch.arange(n_qb) * 64 + lk - lq
    last = torch.clamp(first + 63, max=lk - 1)
    if causal:   # nothing wholly after the block's last visible key
        assert not (blocks & (torch.arange(n_kb)[None, :] * 64 > last[:, None])).any()
    forced = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    forced[:, 0] = True
    for m in range(n_qb):
        forced[m, first[m] // 64:last[m] // 64 + 1] = True
    assert (blocks | ~forced).all(), "the sink block and the diagonal block(s) must be kept"
    # top_k blocks, or just the forced ones when they alone exceed top_k
    assert (layout.block_count.long() <= forced.sum(-1).clamp(min=top_k)).all()
    # every chosen block that is not forced scores at least as high as every allowed block left out
    logits = _pooled_logits(q, k)                                     # [B, H, nQb, nKb]
    allowed = (torch.arange(n_kb)[None, :] * 64 <= last[:, None]) if causal else torch.ones(n_qb, n_kb, dtype=bool)
    chosen_free = blocks & ~forced
    dropped = allowed & ~blocks
    low = torch.where(chosen_free, logits, float("inf")).amin(-1)
    high = torch.where(dropped, logits, float("-inf")).amax(-1)
    assert (low >= high - 1e-5).all(), "a better-scoring key block was dropped"
    if lq == 1000:
        assert layout.density(causal) < 0.5


def _pooled_logits(q, k, bm=64, bn=64):
    """Mean-pooled query block . mean-pooled key block, scaled, fp64 (partial last blocks averaged over their rows)."""
    def pool(x, b):
        n = -(-x.shape[2] // b)
        return torch.stack([x[:, :, i * b:(i + 1) * b].double().mean(2) for i in range(n)], 2)

    g = q.shape[1] // k.shape[1]
    return pool(q, bm) @ pool(k, bn).repeat_interleave(g, 1).transpose(-1, -2) / q.shape[-1] ** 0.5


@pytest.mark.parametrize("lq,lk", [(1000, 1000), (333, 1111), (65, 300)])
def test_causal_antidiagonal_scoring_in_chunks_gives_the_same_layout(lq, lk, monkeypatch):
    """Causal antidiagonal scoring runs in chunks of query blocks, each scoring only the keys its last row sees
    (`CAUSAL_CHUNKS`): the layout must equal the one-chunk layout, whatever the chunk count."""
    from sparse_attn.patterns import block_sparse
    q, k, _ = make_qkv(2, 4, 2, lq, lk, 32, seed=lq + lk, structured=True)
    layouts = []
    for chunks in (1, 3, block_sparse.CAUSAL_CHUNKS):
        monkeypatch.setattr(block_sparse, "CAUSAL_CHUNKS", chunks)
        layouts.append(sa.estimate(q, k, sa.BlockSparse(gamma=0.9, scoring="antidiagonal")).check())
    for other in layouts[1:]:
        assert torch.equal(other.block_count, layouts[0].block_count)
        n = int(layouts[0].block_count.max())
        assert torch.equal(other.block_offset[..., :n], layouts[0].block_offset[..., :n])


def test_block_sparse_top_k_1_keeps_sink_and_diagonal():
    q, k, _ = make_qkv(1, 2, 2, 300, 300, 64, seed=1)
    blocks = sa.estimate(q, k, sa.BlockSparse(top_k=1)).to_block_mask()
    n_qb = blocks.shape[2]
    assert blocks[..., 0].all()
    assert blocks[..., torch.arange(n_qb), torch.arange(n_qb)].all()


def test_block_sparse_picks_the_blocks_with_the_highest_pooled_scores():
    q, k, _ = make_qkv(1, 2, 2, 512, 512, 64, seed=2)
    gen = torch.Generator().manual_seed(0)
    boost = torch.randn(1, 2, 1, 64, generator=gen)
    hot = 3                                            # make key block 3 attractive to every query
    k = k.clone()
    k[:, :, hot * 64:(hot + 1) * 64] += 3 * boost
    q = q + boost
    layout = sa.estimate(q, k, sa.BlockSparse(top_k=3))
    blocks = layout.to_block_mask()
    assert blocks[:, :, hot + 1:, hot].all(), "the hot block should be chosen by every later query block"


# ---------------------------------------------------------------------------------------------------- dense
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk", [(1, 1), (63, 63), (65, 300), (113, 113), (1, 130)])
def test_dense_pattern_covers_everything(lq, lk, causal):
    q, k, _ = make_qkv(2, 2, 1, lq, lk, 32, seed=5)
    layout = sa.estimate(q, k, sa.Dense(), causal=causal).check()
    visible = _visible(lq, lk, causal)
    assert (layout.to_mask() | ~visible).all()
    assert layout.density(causal) == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------------- heads and batch
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_heads,hkv", [(3, 3), (4, 2), (6, 1), (6, 3)])
def test_per_head_list_equals_each_pattern_alone(n_heads, hkv, causal):
    q, k, _ = make_qkv(2, n_heads, hkv, 400, 460, 64, seed=n_heads, structured=True)
    patterns = per_head_mix(n_heads, 400)
    mixed = sa.estimate(q, k, patterns, causal=causal).check()
    mask = mixed.to_mask()
    for h, p in enumerate(patterns):
        alone = sa.estimate(q, k, p, causal=causal).to_mask()[:, h]
        assert torch.equal(mask[:, h], alone), f"head {h} ({p}) differs from its pattern estimated alone"


@pytest.mark.parametrize("name", ["vslash", "vslash_gamma", "block_topk", "block_gamma", "mix"])
def test_batch_rows_are_estimated_independently(name):
    q, k, _ = make_qkv(2, 4, 2, 500, 500, 64, seed=21, structured=True)
    pattern = resolve_pattern(name, 4)
    layout = sa.estimate(q, k, pattern)
    for b in range(2):
        alone = sa.estimate(q[b:b + 1], k[b:b + 1], pattern)
        assert torch.equal(layout.to_mask()[b:b + 1], alone.to_mask())


@pytest.mark.parametrize("name", ["vslash", "vslash_gamma", "block_topk", "block_gamma", "mix"])
def test_gqa_estimate_equals_repeated_kv(name):
    q, k, _ = make_qkv(2, 4, 2, 300, 300, 64, seed=13, structured=True)
    pattern = resolve_pattern(name, 4)
    gqa = sa.estimate(q, k, pattern).to_mask()
    mha = sa.estimate(q, k.repeat_interleave(2, 1), pattern).to_mask()
    assert torch.equal(gqa, mha)


def test_pattern_none_is_the_default_pattern():
    q, k, _ = make_qkv(1, 2, 2, 300, 300, 64, seed=3)
    assert torch.equal(sa.estimate(q, k, None).to_mask(), sa.estimate(q, k, sa.DEFAULT_PATTERN).to_mask())


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("make,name", [
    (lambda: sa.AShape(sink=-1), "sink"),
    (lambda: sa.AShape(local=-5), "local"),
    (lambda: sa.VerticalSlash(vertical=-1), "vertical"),
    (lambda: sa.VerticalSlash(slash=-64), "slash"),
    (lambda: sa.VerticalSlash(last_q=0), "last_q"),
    (lambda: sa.VerticalSlash(sink=-2, vertical=10), "sink"),
    (lambda: sa.VerticalSlash(vertical=10, sink=20), "sink"),
    (lambda: sa.VerticalSlash(slash=32, local=64), "local"),
    (lambda: sa.VerticalSlash(gamma=0.0), "gamma"),
    (lambda: sa.VerticalSlash(gamma=1.5), "gamma"),
    (lambda: sa.VerticalSlash(gamma=-0.1), "gamma"),
    (lambda: sa.VerticalSlash(min_vertical=-1), "min_vertical"),
    (lambda: sa.BlockSparse(top_k=0), "top_k"),
    (lambda: sa.BlockSparse(top_k=-3), "top_k"),
    (lambda: sa.BlockSparse(gamma=0), "gamma"),
    (lambda: sa.BlockSparse(gamma=1.01), "gamma"),
])
def test_invalid_patterns_are_rejected(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_gamma_one_is_allowed():
    sa.VerticalSlash(gamma=1.0)
    sa.BlockSparse(gamma=1.0)


def test_ranges_to_tiles_with_no_ranges():
    from sparse_attn.estimators.tiles import ranges_to_tiles
    empty = torch.zeros(2, 0, dtype=torch.long)
    count, offsets = ranges_to_tiles(empty, empty, 64, 3)
    assert count.tolist() == [0, 0] and offsets.shape == (2, 3)


def test_pattern_base_classes_refuse_instantiation():
    from sparse_attn.patterns.base import Pattern
    from sparse_attn.patterns.vertical_slash import VerticalSlashBudgets
    for base in (Pattern, VerticalSlashBudgets):
        with pytest.raises(TypeError, match=f"{base.__name__} is a base class of patterns"):
            base()
