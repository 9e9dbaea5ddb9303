"""Modality-aware patterns (Grid, QBoundary, TwoDBoundary) and their input description (ModalitySpans)."""
import importlib.util
import os

import pytest
import torch

import sparse_attn as sa
from helpers import causal_mask, make_qkv
from sparse_attn.tools.metrics import attention_recall
from sparse_attn.estimators.frame_period import detect_period
from sparse_attn.estimators.row_sample import rows_probs
from sparse_attn.estimators.sample_mass import diagonal_mass
from sparse_attn.tools.synthetic import MixedWorkload, make_mixed_qkv

SMALL = dict(vertical=24, slash=128, sink=4, local=32, last_q=32)
FAMILIES = {
    "grid": lambda **kw: sa.Grid(width=2, **kw),
    "grid_tiles": lambda **kw: sa.Grid(width=2, tail_columns=False, **kw),
    "qboundary": sa.QBoundary,
    "2dboundary": sa.TwoDBoundary,
}
# (k_len, spans): block-unaligned spans, a single frame, text only, back-to-back images, a video at the start
SPAN_CASES = {
    "unaligned": (700, [(37, 421, "video", 48), (430, 433, "image"), (500, 613, "image")]),
    "single_frame": (300, [(65, 195, "video", 130)]),
    "text_only": (260, []),
    "back_to_back_images": (400, [(50, 150, "image"), (150, 250, "image"), (250, 300, "image")]),
    "video_first": (390, [(0, 320, "video", 40)]),
}


def _check_against_oracle(q, k, v, layout, causal=True):
    layout.check()
    mask = layout.to_mask()
    ref = sa.reference_attention(q, k, v, mask, causal=causal)
    out = sa.sparse_attention(q, k, v, layout, causal=causal, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    return mask


# ---------------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("case", list(SPAN_CASES))
@pytest.mark.parametrize("family", ["grid", "qboundary", "2dboundary"])
@pytest.mark.parametrize("lq_less", [False, True])
def test_layout_runs_like_the_oracle_on_awkward_spans(family, case, lq_less):
    lk, spans = SPAN_CASES[case]
    lq = 113 if lq_less else lk
    q, k, v = make_qkv(2, 4, 2, lq, lk, 32, seed=lk + lq, structured=True, contiguity="blhd" if lq_less else
                       "contiguous")
    pattern = FAMILIES[family](**SMALL).with_modality(spans)
    layout = sa.estimate(q, k, pattern)
    assert (layout.batch, layout.heads, layout.q_len, layout.k_len) == (2, 4, lq, lk)
    mask = _check_against_oracle(q, k, v, layout)
    # every row keeps its own key and the sinks (forced in every part)
    rows = torch.arange(lq) + lk - lq
    assert mask[..., torch.arange(lq), rows].all()
    assert mask[..., :SMALL["sink"]].all()
    if lk >= 400 and not lq_less:
        assert layout.density() < 0.95


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("lq,lk,hq,hkv", [(1, 1, 2, 1), (63, 63, 4, 4), (65, 65, 4, 1), (1, 130, 4, 2),
                                          (113, 700, 6, 2)])
def test_full_budgets_give_the_dense_result(family, lq, lk, hq, hkv):
    spans = [(min(10, lk - 1), lk, "video", lk - min(10, lk - 1))] if lk > 1 else []
    q, k, v = make_qkv(2, hq, hkv, lq, lk, 32, seed=lq * 7 + lk)
    full = dict(vertical=lk, slash=lk + 64, min_vertical=0, min_slash=0, sink=1, local=1)
    layout = sa.estimate(q, k, FAMILIES[family](**full).with_modality(spans))
    assert (layout.to_mask() | ~causal_mask(lq, lk)).all()
    dense = sa.reference_attention(q, k, v)
    torch.testing.assert_close(sa.sparse_attention(q, k, v, layout), dense, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(sa.reference_attention(q, k, v, layout.to_mask()), dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_row_spans_and_non_causal(family):
    """Batch 2 with a different span layout per row, per-head pattern lists mixing families, causal=False."""
    q, k, v = make_qkv(2, 4, 2, 200, 300, 32, seed=5, structured=True)
    rows = (sa.ModalitySpans.of([(20, 260, "video", 60)], 300), sa.ModalitySpans.of([(100, 164, "image")], 300))
    pattern = FAMILIES[family](**SMALL).with_modality(rows)
    per_head = [pattern, sa.VerticalSlash(**SMALL), pattern, sa.AShape(sink=4, local=32)]
    for causal in (True, False):
        layout = sa.estimate(q, k, per_head, causal=causal)
        _check_against_oracle(q, k, v, layout, causal)
        alone = [sa.estimate(q[b:b + 1], k[b:b + 1], FAMILIES[family](**SMALL).with_modality(rows[b]),
                             causal=causal).to_mask() for b in range(2)]
        assert torch.equal(layout.to_mask()[:, [0, 2]], torch.cat(alone)[:, [0, 2]])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_only_is_vertical_slash(family):
    """Without image or video tokens every modality pattern reduces to one vertical-slash estimate."""
    q, k, _ = make_qkv(2, 4, 2, 150, 333, 32, seed=9, structured=True)
    for gamma in (None, 0.8):
        vs = sa.estimate(q, k, sa.VerticalSlash(gamma=gamma, min_vertical=8, min_slash=64, **SMALL)).to_mask()
        pattern = FAMILIES[family](gamma=gamma, min_vertical=8, min_slash=64, consistent_columns=False, **SMALL)
        assert torch.equal(sa.estimate(q, k, pattern.with_modality([])).to_mask(), vs)


def test_qboundary_estimates_each_modality_from_its_own_rows():
    """Rows before a boundary get their structure from their own last queries: a text span whose queries look at
    one far key (and the following image rows that do not) must list that key only for the text blocks."""
    L, D = 512, 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, L, D, generator=gen) * 0.1
    k = torch.randn(1, 1, L, D, generator=gen) * 0.1
    v = torch.randn(1, 1, L, D, generator=gen)
    k[..., 100, 0] = 30.0
    q[..., :320, 0] = 1.0                                  # text rows [0, 320) look at key 100; image rows avoid it
    q[..., 320:, 0] = -1.0
    spans = [(320, L, "image")]
    small = dict(vertical=8, slash=64, sink=1, local=64, last_q=32)
    layout = sa.estimate(q, k, sa.QBoundary(**small).with_modality(spans))
    mask = layout.to_mask()[0, 0]
    assert mask[200:320, 100].all() and not mask[384:, 100].any()
    # one estimate from the last (image) rows misses it for the text rows
    assert not sa.estimate(q, k, sa.VerticalSlash(**small)).to_mask()[0, 0, 200:320, 100].all()
    _check_against_oracle(q, k, v, layout)


def test_twodboundary_keeps_columns_inside_their_key_modality():
    q, k, v = make_qkv(1, 2, 1, 400, 400, 32, seed=3, structured=True)
    spans = [(100, 300, "image")]
    for v_budget in (16, 40):
        layout = sa.estimate(q, k, sa.TwoDBoundary(vertical=v_budget, slash=64, sink=4, local=64, last_q=32)
                             .with_modality(spans))
        cols, valid = layout.sorted_columns()
        # blocks 2 and 3 hold image rows only: at most `vertical` columns per key modality (text, image)
        cols, valid = cols[:, :, 2:4], valid[:, :, 2:4]
        in_image = (cols >= 100) & (cols < 300)
        assert int((valid & in_image).sum(-1).max()) <= v_budget
        assert int((valid & ~in_image).sum(-1).max()) <= v_budget
        _check_against_oracle(q, k, v, layout)


# ---------------------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("width,tail_columns", [(0, True), (3, True), (3, False)])
def test_grid_lists_the_same_phase_in_every_earlier_frame(width, tail_columns):
    q, k, v = make_qkv(2, 4, 2, 300, 500, 32, seed=11)
    start, end, frame = 60, 460, 50
    grid = sa.Grid(width=width, tail_columns=tail_columns, **SMALL)
    layout = sa.estimate(q, k, grid.with_modality([(start, end, "video", frame)]))
    mask = _check_against_oracle(q, k, v, layout)
    for row in range(300):
        pos = row + 200
        if start <= pos < end:
            for shift in range(-width, width + 1):
                keys = torch.arange(pos - frame + shift, start - 1, -frame)
                keys = keys[(keys < end) & (keys <= pos)]
                assert mask[:, :, row, keys].all(), (row, shift, keys)


def test_grid_detects_the_frame_stride_on_the_mixed_workload():
    w = MixedWorkload(batch=2, q_heads=4, kv_heads=2, seq_len=3000, head_dim=64, text_before=200, text_after=300,
                      frame_tokens=100)
    q, k, v, spans = make_mixed_qkv(w)
    video = spans.spans[0]
    assert video.frame_tokens == 100 and video.length == 2500
    rows = torch.arange(video.end - 64, video.end)
    probs, pos = rows_probs(q, k, rows, 64 ** -0.5)
    diag = diagonal_mass(probs[..., video.start:video.end], pos - video.start, video.length)
    assert detect_period(diag, 16, video.length - 1, window=8, min_distance=64).eq(100).all()
    # through the pattern: detected stride gives the same layout as the given one
    grid = sa.Grid(vertical=64, slash=256, width=8, sink=4, local=64)
    given = sa.estimate(q, k, grid.with_modality(spans)).to_mask()
    undescribed = [(video.start, video.end, "video")]
    assert torch.equal(sa.estimate(q, k, grid.with_modality(undescribed)).to_mask(), given)
    # a given pattern stride is used when the spans do not name one
    assert torch.equal(sa.estimate(q, k, sa.Grid(vertical=64, slash=256, width=8, sink=4, local=64, stride=100)
                                   .with_modality(undescribed)).to_mask(), given)


def test_detect_period_reports_no_period_without_one():
    gen = torch.Generator().manual_seed(0)
    flat = torch.rand(3, 2000, generator=gen)
    assert detect_period(flat, 16, 1999, window=4, min_distance=32).eq(0).all()
    comb = flat * 0.01
    comb[:, ::137] += 1.0
    assert detect_period(comb, 16, 1999, window=4, min_distance=32).eq(137).all()


def test_modality_patterns_beat_vertical_slash_on_the_mixed_workload():
    """On video rows the vertical-slash estimate from the last (text) queries misses the grid; the modality-aware
    estimates keep more of the attention mass at comparable budgets (a small deterministic workload)."""
    w = MixedWorkload(q_heads=4, kv_heads=2, seq_len=4096, head_dim=64, text_before=300, text_after=400,
                      frame_tokens=256)
    q, k, v, spans = make_mixed_qkv(w)
    budgets = dict(vertical=256, slash=1024, sink=64, local=64)
    vs = attention_recall(q, k, sa.estimate(q, k, sa.VerticalSlash(**budgets)))
    for family in FAMILIES.values():
        layout = sa.estimate(q, k, family(**budgets).with_modality(spans))
        assert attention_recall(q, k, layout) > max(vs + 0.03, 0.95), family


# ---------------------------------------------------------------------------------------------------- spans
@pytest.mark.parametrize("spans,length,message", [
    ([(0, 10, "image"), (5, 20, "video")], None, "overlap"),
    ([(0, 10, "text"), (10, 2000, "image")], 1000, "ends past the sequence length"),
    ([(0, 100, "video", 30)], None, "must divide the span length"),
    ([(0, 10, "audio")], None, "kind must be one of"),
    ([(10, 10, "image")], None, "must be > start"),
    ([(-1, 10, "image")], None, "start must be an int >= 0"),
    ([(0, 10, "image", 5)], None, "only for video"),
    ([(0, 10, "video", 0)], None, "positive int"),
])
def test_bad_spans_raise_clear_errors(spans, length, message):
    with pytest.raises(ValueError, match=message):
        sa.ModalitySpans.of(spans, length)
    if length is None:                       # a pattern given the raw list reports it too
        with pytest.raises(ValueError, match=message):
            sa.QBoundary(modality=spans)


def test_spans_checked_against_the_inputs():
    q, k, _ = make_qkv(1, 2, 1, 50, 100, 32)
    with pytest.raises(ValueError, match="ends past the sequence"):
        sa.estimate(q, k, sa.Grid(**SMALL).with_modality([(50, 150, "video")]))
    with pytest.raises(ValueError, match="length 120"):
        sa.estimate(q, k, sa.QBoundary(**SMALL).with_modality(sa.ModalitySpans.of([(0, 10, "image")], 120)))
    with pytest.raises(ValueError, match="3 per-row span descriptions for batch 1"):
        sa.estimate(q, k, sa.TwoDBoundary(**SMALL, modality=(sa.ModalitySpans(),) * 3))
    with pytest.raises(ValueError, match="modality"):
        sa.QBoundary(modality=42)
    with pytest.raises(ValueError, match="stride"):
        sa.Grid(stride=0)
    with pytest.raises(ValueError, match="local"):
        sa.QBoundary(local=100, slash=50)


def test_spans_from_token_types():
    ids = torch.tensor([0] * 5 + [1] * 4 + [0] * 3 + [2] * 6 + [1] * 2)
    spans = sa.ModalitySpans.from_token_types(ids[None], frame_tokens=3)
    assert spans.length == 20
    assert [(s.start, s.end, s.kind, s.frame_tokens) for s in spans.spans] == [
        (5, 9, "image", None), (12, 18, "video", 3), (18, 20, "image", None)]
    assert spans.kind_ids(20).tolist() == ids.tolist()
    assert spans.intervals("text", 20) == [(0, 5), (9, 12)]
    custom = sa.ModalitySpans.from_token_types([7, 7, 9, 9], kinds={7: "text", 9: "video"})
    assert [(s.start, s.end, s.kind) for s in custom.spans] == [(2, 4, "video")]
    with pytest.raises(ValueError, match="ids \\[3\\] have no kind"):
        sa.ModalitySpans.from_token_types(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="must divide"):
        sa.ModalitySpans.from_token_types(ids, frame_tokens=4)
    with pytest.raises(ValueError, match="1-d int tensor"):
        sa.ModalitySpans.from_token_types(torch.zeros(2, 5, dtype=torch.long))


def test_spans_from_qwen2_vl_grids():
    IMG, VID = 151655, 151656
    # text(3) image(2x2 merged = 4) image(4) text(2) video(2 frames x 6) text(1): back-to-back images split
    ids = [1, 2, 3] + [IMG] * 8 + [4, 5] + [VID] * 12 + [6]
    spans = sa.ModalitySpans.from_grid_thw(ids, image_token_id=IMG, video_token_id=VID,
                                           image_grid_thw=[[1, 4, 4], [1, 4, 4]], video_grid_thw=[[2, 4, 6]],
                                           spatial_merge_size=2)
    assert [(s.start, s.end, s.kind, s.frame_tokens) for s in spans.spans] == [
        (3, 7, "image", None), (7, 11, "image", None), (13, 25, "video", 6)]
    assert spans.length == len(ids)
    with pytest.raises(ValueError, match="asks for 8 image tokens, input_ids has 4"):
        sa.ModalitySpans.from_grid_thw([IMG] * 4, image_token_id=IMG, image_grid_thw=[[1, 4, 4]] * 2)
    with pytest.raises(ValueError, match="not contiguous"):
        sa.ModalitySpans.from_grid_thw([IMG, IMG, 0, IMG, IMG], image_token_id=IMG, image_grid_thw=[[1, 4, 4]])
    with pytest.raises(ValueError, match="without image_token_id"):
        sa.ModalitySpans.from_grid_thw([0, 1], image_grid_thw=[[1, 2, 2]])


# ---------------------------------------------------------------------------------------------------- bench helper
def test_bench_recall_helper_matches_attention_recall():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "modality_recall.py")
    spec = importlib.util.spec_from_file_location("modality_recall", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    q, k, _ = make_qkv(1, 4, 2, 300, 450, 32, seed=2, structured=True)
    layouts = [sa.estimate(q, k, p) for p in (sa.VerticalSlash(**SMALL), sa.AShape(sink=4, local=64))]
    for got, layout in zip(module.recalls(q, k, layouts, rows_per_chunk=128), layouts):
        assert got == pytest.approx(attention_recall(q, k, layout), rel=1e-5)


def test_consistent_column_mass_ignores_diagonals():
    from sparse_attn.estimators.row_sample import consistent_column_mass
    probs = torch.zeros(1, 1, 8, 40)
    probs[0, 0, torch.arange(8), torch.arange(8) + 10] = 1.0       # a diagonal crossing the sample
    probs[0, 0, :, 3] = 0.5                                          # a column every row uses
    score = consistent_column_mass(probs)[0, 0]
    assert score[3] == pytest.approx(4.0) and score[10:18].eq(0).all()
    assert consistent_column_mass(probs[:, :, :1])[0, 0, 3] == pytest.approx(0.5)
