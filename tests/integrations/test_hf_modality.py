"""Modality spans per call in `sparse_attn.hf` (``with sah.modality(spans)``): a tiny random-weight Llama with a
per-head mix of modality-aware and text patterns against the same model with transformers' `sdpa` attention (the
dense oracle at model level), the estimated patterns carrying the spans, bad spans, and the context variable's
scope."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_attn as sa  # noqa: E402
import sparse_attn.hf as sah  # noqa: E402
from sparse_attn import prefill  # noqa: E402
from sparse_attn.config import SparseConfig  # noqa: E402

VOCAB, L, HEADS, LAYERS = 128, 200, 4, 2        # L is not a multiple of the 64-row blocks
FULL = dict(vertical=10**6, slash=10**6, min_vertical=0, min_slash=0, sink=1, local=1)   # covers every key
# a video of 4 frames of 29 tokens (not block aligned), an image right after it, text around and after
SPANS = [(13, 129, "video", 29), (129, 161, "image")]
ROW1_SPANS = [(5, 50, "image"), (60, 150, "video", 30)]


def _model():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                                      max_position_embeddings=512, pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(batch=1, seed=1):
    return torch.randint(1, VOCAB, (batch, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, mask=None):
    return model(ids, attention_mask=mask).logits


def _full_mix_config():
    """Per head a mix of Grid / QBoundary / TwoDBoundary / VerticalSlash, all with budgets covering every key."""
    layer0 = [sa.Grid(**FULL), sa.QBoundary(**FULL), sa.VerticalSlash(**FULL), sa.TwoDBoundary(**FULL)]
    layer1 = [sa.VerticalSlash(**FULL), sa.Grid(width=2, **FULL), sa.TwoDBoundary(gamma=1.0, **FULL),
              sa.QBoundary(**FULL)]
    return SparseConfig(LAYERS, HEADS, [layer0, layer1])


def _spy_estimate(monkeypatch):
    """Records the per-head patterns every sparse call estimates with."""
    seen = []
    real = prefill.estimate

    def spy(q, k, patterns, **kw):
        seen.append((q.shape[0], list(patterns)))
        return real(q, k, patterns, **kw)

    monkeypatch.setattr(prefill, "estimate", spy)
    return seen


def test_full_budget_modality_mix_equals_sdpa_and_carries_spans(monkeypatch):
    model = _model()
    ids = _ids()
    dense = _logits(model, ids)
    cfg = _full_mix_config()
    sah.patch(model, cfg, dense_below=0, dense_above=1.0)
    seen = _spy_estimate(monkeypatch)
    with sah.modality(SPANS) as spans:
        got = _logits(model, ids)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
    assert spans == sa.ModalitySpans.of(SPANS)
    assert len(seen) == LAYERS
    for layer, (_, patterns) in enumerate(seen):
        for used, written in zip(patterns, cfg.layers[layer]):
            if isinstance(written, sa.VerticalSlash):
                assert used is written                                         # text patterns untouched
            else:
                assert used == written.with_modality(spans) and used.modality == spans


def test_left_padded_batch_uses_each_rows_spans(monkeypatch):
    """Spans index each row's tokens without its padding; the rows run one by one, each with its own spans."""
    model = _model()
    ids = _ids(2, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    ids[1, :37] = 0
    dense = _logits(model, ids, mask)
    sah.patch(model, _full_mix_config(), dense_below=0, dense_above=1.0)
    seen = _spy_estimate(monkeypatch)
    with sah.modality([SPANS, ROW1_SPANS]):                                # row 1: 163 tokens after padding
        got = _logits(model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], dense[keep], rtol=1e-4, atol=1e-4)
    assert len(seen) == 2 * LAYERS and all(b == 1 for b, _ in seen)                # rows 0, 1 of each layer
    assert [p[3].modality for _, p in seen] == [sa.ModalitySpans.of(SPANS), sa.ModalitySpans.of(ROW1_SPANS)] * LAYERS


def test_per_row_spans_in_an_unpadded_batch(monkeypatch):
    model = _model()
    ids = _ids(2, seed=3)
    dense = _logits(model, ids)
    sah.patch(model, _full_mix_config(), dense_below=0, dense_above=1.0)
    seen = _spy_estimate(monkeypatch)
    with sah.modality([sa.ModalitySpans.of(SPANS), ROW1_SPANS]):
        got = _logits(model, ids)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
    assert seen[0][1][0].modality == (sa.ModalitySpans.of(SPANS), sa.ModalitySpans.of(ROW1_SPANS))


def test_without_spans_modality_patterns_see_text_only(monkeypatch):
    """Outside a modality block the call is all text: QBoundary with plain column mass is then VerticalSlash."""
    model = _model()
    ids = _ids()
    budgets = dict(vertical=8, slash=64, sink=4, local=16, min_vertical=8, min_slash=64)
    sah.patch(model, sa.VerticalSlash(**budgets), dense_below=0, dense_above=1.0)
    text = _logits(model, ids)
    sah.patch(model, sa.QBoundary(consistent_columns=False, **budgets), dense_below=0, dense_above=1.0)
    seen = _spy_estimate(monkeypatch)
    torch.testing.assert_close(_logits(model, ids), text, rtol=0, atol=1e-6)
    assert all(p.modality == sa.ModalitySpans() for _, patterns in seen for p in patterns)
    sah.patch(model, _full_mix_config(), dense_below=0, dense_above=1.0)     # a Grid head without spans runs
    sah.unpatch(model)
    dense = _logits(model, ids)
    sah.patch(model, _full_mix_config(), dense_below=0, dense_above=1.0)
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spans, error, match", [
    ([(0, 10, "audio")], ValueError, r"spans: .*kind must be one of"),
    ([(0, 50, "image"), (40, 60, "video")], ValueError, r"spans: .*overlap"),
    ([(0, 50, "video", 7)], ValueError, r"spans: .*frame_tokens \(7\) must divide"),
    ("0:10:video", TypeError, r"spans: spans must be a list"),
    (None, TypeError, r"spans must be a ModalitySpans"),
    ([(0, 10)], TypeError, r"spans: .*each entry must be"),
])
def test_bad_spans_raise_naming_the_argument(spans, error, match):
    with pytest.raises(error, match=match):
        with sah.modality(spans):
            pass                                                              # pragma: no cover
    assert sah.current_spans() is None


def test_spans_that_do_not_fit_the_call_raise():
    model = _model()
    sah.patch(model, _full_mix_config(), dense_below=0, dense_above=1.0)
    with sah.modality([(100, L + 10, "image")]), pytest.raises(ValueError, match=r"ends past the 200 keys"):
        _logits(model, _ids())
    with sah.modality([SPANS, SPANS, SPANS]), pytest.raises(ValueError, match=r"3 per-row entries for a batch of 2"):
        _logits(model, _ids(2))


def test_context_var_is_reset_after_the_block_and_on_errors():
    assert sah.current_spans() is None
    with sah.modality(SPANS) as outer:
        with sah.modality([(0, 4, "image")]) as inner:
            assert sah.current_spans() == inner
        assert sah.current_spans() == outer
    assert sah.current_spans() is None
    with pytest.raises(RuntimeError, match="boom"):
        with sah.modality(SPANS):
            raise RuntimeError("boom")
    assert sah.current_spans() is None
