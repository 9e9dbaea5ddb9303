"""SparseLayout: construction checks, index checks, and the views/conversions (mask, block mask, density,
FlexAttention) as properties over random valid layouts."""
import random
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparse_attn as sa
from sparse_attn import SparseLayout
from helpers import assert_close, causal_mask, make_qkv, mask_from_sets, random_layout

BLOCKS = st.sampled_from([(16, 16), (32, 16), (16, 32), (64, 64), (32, 64)])


@st.composite
def layout_cases(draw, aligned=False):
    block_m, block_n = draw(BLOCKS)
    q_len = draw(st.integers(1, 150))
    k_len = draw(st.integers(q_len, q_len + draw(st.sampled_from([0, 1, 40, 150]))))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2 ** 31))
    layout, tiles, cols = random_layout(random.Random(seed), B, H, q_len, k_len, block_m, block_n, aligned=aligned)
    return layout, tiles, cols


def block_rows(mask, block_m):
    """[B, H, nQb, Lk]: the mask row of each query block (all rows of a block share one key set)."""
    return mask[:, :, ::block_m]


def aligned_cover(rows, block_n):
    """[B, H, nQb, nKb]: True where a key block holds any True key of the row."""
    Lk = rows.shape[-1]
    n_kb = -(-Lk // block_n)
    padded = torch.nn.functional.pad(rows, (0, n_kb * block_n - Lk))
    return padded.reshape(*rows.shape[:-1], n_kb, block_n).any(-1)


def block_limit(layout):
    """One past the last key position visible to each query block under bottom-right causal masking, [nQb]."""
    starts = torch.arange(layout.num_query_blocks) * layout.block_m
    last = (starts + layout.block_m).clamp(max=layout.q_len) - 1
    return last + layout.k_len - layout.q_len + 1


# ---------------------------------------------------------------------------------------------------- properties
@given(layout_cases())
def test_random_valid_layouts_pass_check(case):
    layout, _, _ = case
    assert layout.check() is layout


@given(layout_cases())
def test_to_mask_lists_exactly_the_tile_and_column_keys(case):
    layout, tiles, cols = case
    B, H = layout.batch, layout.heads
    expected = mask_from_sets(tiles, cols, B, H, layout.q_len, layout.k_len, layout.block_m, layout.block_n)
    mask = layout.to_mask()
    assert mask.dtype == torch.bool and mask.shape == (B, H, layout.q_len, layout.k_len)
    assert torch.equal(mask, expected)


@given(layout_cases(), st.booleans())
def test_to_block_mask_is_the_aligned_cover_of_the_mask(case, causal):
    layout, _, _ = case
    rows = block_rows(layout.to_mask(), layout.block_m)
    if causal:
        rows = rows & (torch.arange(layout.k_len)[None, :] < block_limit(layout)[:, None])
    got = layout.to_block_mask(causal=causal)
    assert got.dtype == torch.bool
    assert torch.equal(got, aligned_cover(rows, layout.block_n))


@given(layout_cases(), st.booleans())
def test_density_counts_listed_visible_pairs(case, causal):
    layout, _, _ = case
    mask = layout.to_mask()
    if causal:
        allowed = causal_mask(layout.q_len, layout.k_len).expand_as(mask)
    else:
        allowed = torch.ones_like(mask)
    expected = (mask & allowed).sum().item() / allowed.sum().item()
    assert layout.density(causal=causal) == pytest.approx(expected, abs=1e-12)


@given(layout_cases(), st.booleans())
def test_key_counts_are_keys_up_to_the_block_limit(case, causal):
    layout, _, _ = case
    rows = block_rows(layout.to_mask(), layout.block_m)
    if causal:
        rows = rows & (torch.arange(layout.k_len)[None, :] < block_limit(layout)[:, None])
    assert torch.equal(layout.key_counts(causal=causal), rows.sum(-1))


@given(layout_cases(aligned=True))
def test_block_mask_round_trip_on_aligned_layouts(case):
    layout, _, _ = case
    assert layout.is_block_aligned()
    back = SparseLayout.from_block_mask(layout.to_block_mask(), layout.q_len, layout.k_len, layout.block_m,
                                        layout.block_n)
    back.check()
    assert torch.equal(back.to_mask(), layout.to_mask())
    assert back.is_block_aligned()


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), BLOCKS, st.integers(0, 2 ** 31))
def test_from_block_mask_then_to_block_mask_is_identity(B, H, n_qb, n_kb, blocks, seed):
    block_m, block_n = blocks
    gen = torch.Generator().manual_seed(seed)
    bm = torch.rand(B, H, n_qb, n_kb, generator=gen) < torch.rand((), generator=gen)
    q_len = (n_qb - 1) * block_m + 1 + int(torch.randint(block_m, (), generator=gen))
    k_len = max(q_len, (n_kb - 1) * block_n + 1 + int(torch.randint(block_n, (), generator=gen)))
    n_kb = -(-k_len // block_n)
    bm = torch.nn.functional.pad(bm, (0, n_kb - bm.shape[-1]))
    layout = SparseLayout.from_block_mask(bm, q_len, k_len, block_m, block_n).check()
    assert torch.equal(layout.to_block_mask(), bm)
    dense = bm.repeat_interleave(block_m, 2).repeat_interleave(block_n, 3)[:, :, :q_len, :k_len]
    assert torch.equal(layout.to_mask(), dense)


def test_from_block_mask_rejects_wrong_shape():
    with pytest.raises(ValueError, match="block_mask"):
        SparseLayout.from_block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 100, 100)
    with pytest.raises(ValueError, match="block_mask"):
        SparseLayout.from_block_mask(torch.ones(3, 3, dtype=torch.bool), 100, 100)


@given(layout_cases())
def test_is_block_aligned_detects_columns_and_unaligned_tiles(case):
    layout, tiles, cols = case
    aligned = all(s % layout.block_n == 0 for row in tiles for s in row) and not any(cols)
    assert layout.is_block_aligned() == aligned


def test_is_block_aligned_false_for_a_single_unaligned_tile():
    bc = torch.ones(1, 1, 1, dtype=torch.int32)
    layout = SparseLayout(bc, torch.tensor([[[[1]]]], dtype=torch.int32), torch.zeros_like(bc),
                          torch.zeros(1, 1, 1, 0, dtype=torch.int32), q_len=10, k_len=100)
    assert not layout.is_block_aligned()


@given(layout_cases())
def test_select_heads_to_and_concat_keep_the_masks(case):
    from sparse_attn.layout import concat_heads

    layout, _, _ = case
    mask = layout.to_mask()
    order = torch.arange(layout.heads - 1, -1, -1)
    assert torch.equal(layout.select_heads(order).to_mask(), mask[:, order])
    assert torch.equal(layout.to("cpu").to_mask(), mask)
    parts = [layout.select_heads(torch.tensor([h])) for h in range(layout.heads)]
    assert torch.equal(concat_heads(parts).to_mask(), mask)


def test_to_mask_rejects_other_lengths():
    layout = SparseLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 100, 100)
    with pytest.raises(ValueError, match="q_len"):
        layout.to_mask(90, 100)


# ---------------------------------------------------------------------------------------------------- FlexAttention
try:
    from torch.nn.attention import flex_attention as flex
except Exception:  # pragma: no cover - depends on the torch build
    flex = None
needs_flex = pytest.mark.skipif(flex is None, reason="torch.nn.attention.flex_attention does not import")


def _flex(q, k, v, block_mask):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex.flex_attention(q, k, v, block_mask=block_mask)


def _aligned_sparse_layout(q, k, causal):
    layout = sa.estimate(q, k, sa.BlockSparse(top_k=2), causal=causal)
    assert layout.is_block_aligned()
    assert layout.density(causal) < 0.9, "the test needs a genuinely sparse layout"
    return layout


FLEX_SHAPES = [(256, 256, True), (200, 200, True), (130, 300, False), (130, 300, True)]


@pytest.mark.parametrize("lq,lk,causal", FLEX_SHAPES)
@needs_flex
def test_flex_block_mask_gives_the_sparse_attention(lq, lk, causal):
    q, k, v = make_qkv(2, 2, 2, lq, lk, 64, seed=lq + lk)
    layout = _aligned_sparse_layout(q, k, causal)
    out = _flex(q, k, v, layout.to_flex_block_mask(causal=causal))
    assert_close(out, sa.sparse_attention(q, k, v, layout, causal=causal), atol=1e-5)


@pytest.mark.parametrize("lq,lk,causal", FLEX_SHAPES)
@needs_flex
def test_flex_block_mask_blocks_and_round_trip(lq, lk, causal):
    q, k, v = make_qkv(2, 2, 2, lq, lk, 64, seed=lq + lk)
    layout = _aligned_sparse_layout(q, k, causal)
    bm = layout.to_flex_block_mask(causal=causal)
    assert tuple(bm.seq_lengths) == (lq, lk)
    n_qb, n_kb = layout.num_query_blocks, -(-lk // 64)
    assert torch.equal(bm.to_dense().bool()[..., :n_qb, :n_kb], layout.to_block_mask(causal=causal))
    back = SparseLayout.from_flex_block_mask(bm).check()
    visible = causal_mask(lq, lk) if causal else torch.ones(lq, lk, dtype=torch.bool)
    assert torch.equal(back.to_mask() & visible, layout.to_mask() & visible)
    assert_close(sa.sparse_attention(q, k, v, back, causal=causal), sa.sparse_attention(q, k, v, layout,
                                                                                       causal=causal), atol=1e-6)


@needs_flex
@settings(max_examples=8)
@given(layout_cases(aligned=True), st.booleans())
def test_flex_block_mask_of_random_aligned_layouts(case, causal):
    layout, _, _ = case
    q, k, v = make_qkv(layout.batch, layout.heads, layout.heads, layout.q_len, layout.k_len, 16, seed=layout.q_len)
    bm = layout.to_flex_block_mask(causal=causal)
    out, lse = sa.sparse_attention(q, k, v, layout, causal=causal, return_lse=True)
    seen = torch.isfinite(lse)            # flex returns NaN or 0 for empty rows depending on version: skip them
    assert_close(_flex(q, k, v, bm)[seen], out[seen], atol=1e-5)
    back = SparseLayout.from_flex_block_mask(bm).check()
    expected = SparseLayout.from_block_mask(layout.to_block_mask(causal=causal), layout.q_len, layout.k_len,
                                            layout.block_m, layout.block_n)
    assert torch.equal(back.to_mask(), expected.to_mask())


@needs_flex
def test_flex_block_mask_of_a_full_layout_matches_dense_flex():
    # with a full layout the mask_mod alone decides, so this checks the bottom-right causal alignment
    q, k, v = make_qkv(1, 2, 2, 70, 200, 64, seed=2)
    layout = sa.estimate(q, k, sa.Dense())
    out = _flex(q, k, v, layout.to_flex_block_mask(causal=True))
    assert_close(out, sa.reference_attention(q, k, v, causal=True), atol=1e-5)


@needs_flex
def test_to_flex_block_mask_refuses_unaligned_layouts_unless_cover():
    q, k, v = make_qkv(1, 2, 2, 200, 200, 64, seed=3)
    layout = sa.estimate(q, k, sa.AShape(sink=8, local=70))
    assert not layout.is_block_aligned()
    with pytest.raises(ValueError, match="cover"):
        layout.to_flex_block_mask()
    bm = layout.to_flex_block_mask(causal=False, cover=True)
    cover = SparseLayout.from_flex_block_mask(bm).to_mask()
    assert (cover | ~layout.to_mask()).all(), "the cover must contain every listed key"


# ---------------------------------------------------------------------------------------------------- construction errors
def _fields(B=1, H=2, n_qb=2, mb=2, mc=1):
    return dict(block_count=torch.zeros(B, H, n_qb, dtype=torch.int32),
                block_offset=torch.zeros(B, H, n_qb, mb, dtype=torch.int32),
                column_count=torch.zeros(B, H, n_qb, dtype=torch.int32),
                column_index=torch.zeros(B, H, n_qb, mc, dtype=torch.int32))


def test_valid_fields_construct():
    layout = SparseLayout(**_fields(), q_len=100, k_len=120)
    layout.check()
    assert layout.density() == 0.0 and not layout.to_mask().any()


@pytest.mark.parametrize("field", ["block_count", "block_offset", "column_count", "column_index"])
def test_int64_indices_rejected(field):
    fields = _fields()
    fields[field] = fields[field].long()
    with pytest.raises(ValueError, match=f"{field}.*int32"):
        SparseLayout(**fields, q_len=100, k_len=120)


def test_wrong_number_of_query_blocks_rejected():
    with pytest.raises(ValueError, match="query blocks"):
        SparseLayout(**_fields(n_qb=3), q_len=100, k_len=120)      # ceil(100 / 64) = 2
    with pytest.raises(ValueError, match="query blocks"):
        SparseLayout(**_fields(n_qb=2), q_len=64, k_len=120)


@pytest.mark.parametrize("field,shape", [("block_offset", (1, 2, 3, 2)), ("column_index", (1, 1, 2, 1)),
                                         ("column_count", (2, 2, 2))])
def test_mismatched_leading_shapes_rejected(field, shape):
    fields = _fields()
    fields[field] = torch.zeros(shape, dtype=torch.int32)
    with pytest.raises(ValueError, match=field):
        SparseLayout(**fields, q_len=100, k_len=120)


@pytest.mark.parametrize("field,shape", [("block_count", (1, 2)), ("block_offset", (1, 2, 2)),
                                         ("column_index", (1, 2, 2, 1, 1))])
def test_wrong_rank_rejected(field, shape):
    fields = _fields()
    fields[field] = torch.zeros(shape, dtype=torch.int32)
    with pytest.raises(ValueError, match=field):
        SparseLayout(**fields, q_len=100, k_len=120)


@pytest.mark.parametrize("kwargs,name", [(dict(q_len=130, k_len=120), "q_len"), (dict(block_m=0), "block_m"),
                                         (dict(block_n=-64), "block_n"), (dict(k_len=0), "k_len"),
                                         (dict(q_len=100.0), "q_len")])
def test_bad_lengths_and_block_sizes_rejected(kwargs, name):
    args = dict(q_len=100, k_len=120)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        SparseLayout(**_fields(), **args)


def test_non_tensor_field_rejected():
    fields = _fields()
    fields["column_count"] = [[0, 0]]
    with pytest.raises(ValueError, match="column_count"):
        SparseLayout(**fields, q_len=100, k_len=120)


# ---------------------------------------------------------------------------------------------------- index errors
def _layout(offsets, columns, k_len=200, q_len=64):
    """One (b, h, query block) with the given tile offsets and columns."""
    mb, mc = max(len(offsets), 1), max(len(columns), 1)
    bo = torch.zeros(1, 1, 1, mb, dtype=torch.int32)
    bo[..., :len(offsets)] = torch.tensor(offsets, dtype=torch.int32)
    ci = torch.zeros(1, 1, 1, mc, dtype=torch.int32)
    ci[..., :len(columns)] = torch.tensor(columns, dtype=torch.int32)
    return SparseLayout(torch.tensor([[[len(offsets)]]], dtype=torch.int32), bo,
                        torch.tensor([[[len(columns)]]], dtype=torch.int32), ci, q_len=q_len, k_len=k_len)


@pytest.mark.parametrize("offsets,columns,match", [
    ([0, 63], [], "overlap"),
    ([100, 10, 130], [], "overlap"),
    ([0], [5, 70, 5], "repeat"),
    ([64], [100], "inside a tile"),
    ([64], [127], "inside a tile"),
    ([-1], [], "block_offset"),
    ([200], [], "block_offset"),
    ([0], [200], "column_index"),
    ([0], [-3], "column_index"),
])
def test_check_indices_rejects(offsets, columns, match):
    layout = _layout(offsets, columns)
    with pytest.raises(ValueError, match=match):
        layout.check_indices()
    with pytest.raises(ValueError, match=match):
        layout.check()


@pytest.mark.parametrize("offsets,columns", [([0, 64], [128, 199]), ([136], [0, 135]), ([], [7])])
def test_check_indices_accepts_touching_tiles_and_adjacent_columns(offsets, columns):
    _layout(offsets, columns).check()


@pytest.mark.parametrize("field,value", [("block_count", 3), ("block_count", -1), ("column_count", 2),
                                         ("column_count", -2)])
def test_check_indices_rejects_counts_out_of_range(field, value):
    layout = _layout([0], [100])
    getattr(layout, field)[...] = value
    with pytest.raises(ValueError, match=field):
        layout.check_indices()


def test_padding_is_never_read_by_check():
    layout = _layout([0], [100])
    layout.block_offset = torch.tensor([[[[0, -5, 10_000]]]], dtype=torch.int32)
    layout.column_index = torch.tensor([[[[100, 100, -1]]]], dtype=torch.int32)
    layout.check()
    expected = torch.zeros(64, 200, dtype=torch.bool)
    expected[:, :64] = True
    expected[:, 100] = True
    assert torch.equal(layout.to_mask()[0, 0], expected)


def test_estimator_layout_to_mask_is_per_block_constant():
    q, k, _ = make_qkv(2, 2, 1, 150, 260, 64, seed=4)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=16, slash=64, sink=4, local=64))
    mask = layout.to_mask()
    for m in range(layout.num_query_blocks):
        rows = mask[:, :, m * 64:(m + 1) * 64]
        assert (rows == rows[:, :, :1]).all()
