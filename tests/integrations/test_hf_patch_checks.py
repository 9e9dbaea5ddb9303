"""`sparse_attn.hf.patch` on models whose own attention has extras: Gemma-2's softcap runs sparse, sliding-window
layers are named once at patch time, empty budgets and unsupported settings are refused before anything changes."""
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_attn as sa  # noqa: E402
import sparse_attn.hf as sah  # noqa: E402
from sparse_attn import prefill  # noqa: E402
from sparse_attn.integrations.hf.attention import STATE_ATTR  # noqa: E402
from sparse_attn.tools.tiny_model import tiny_causal_lm  # noqa: E402

VOCAB, L = 128, 200
FULL = sa.VerticalSlash(vertical=10**6, slash=10**6)


def _model(family="llama", layers=2, **fields):
    return tiny_causal_lm(family, layers, hidden=64, vocab=VOCAB, **fields)


def _ids(batch=1, seed=1):
    return torch.randint(3, VOCAB, (batch, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, mask=None):
    return model(ids, attention_mask=mask).logits


def _sliding_warnings(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if "sliding window" in str(w.message)]


# ------------------------------------------------------------------------------------ softcap
def test_gemma2_softcap_runs_sparse_and_equals_eager(monkeypatch):
    """Full budget on Gemma-2 (softcap 2.0, alternating sliding layers): the full-attention layers run the sparse
    kernel with the cap and the logits equal the model's own eager attention, single row and left-padded batch."""
    model = _model(family="gemma2", layers=4)
    ids, batch = _ids(), _ids(2, seed=2)
    mask = torch.ones_like(batch)
    mask[1, :37] = 0
    dense, dense_batch = _logits(model, ids), _logits(model, batch, mask)
    # The cap matters at this size: without it the logits move far beyond the tolerance used below.
    uncapped = _model(family="gemma2", layers=4, attn_logit_softcapping=None)
    assert (_logits(uncapped, ids) - dense).abs().max() > 1e-2

    caps = []
    real = prefill.sparse_attention
    monkeypatch.setattr(prefill, "sparse_attention", lambda *a, **kw: caps.append(kw["softcap"]) or real(*a, **kw))
    sah.patch(model, FULL, dense_below=0, dense_above=1.0)
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)
    assert caps == [2.0, 2.0]                      # layers 1 and 3 (0 and 2 slide with a 48-key window)
    keep = mask.bool()
    torch.testing.assert_close(_logits(model, batch, mask)[keep], dense_batch[keep], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        sah.unpatch(model)
        assert torch.equal(tokens, model.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "flex"}, r"backend: 'flex' does not implement softcap"),
    ({"retrieval": {}}, r"retrieval: .*soft-caps"),
])
def test_softcap_settings_that_cannot_run_are_refused_at_patch(kwargs, match):
    model = _model(family="gemma2", layers=2)
    with pytest.raises(ValueError, match=match):
        sah.patch(model, **kwargs)
    assert model.config._attn_implementation == "eager" and not sah.is_patched(model)


def test_attention_sinks_are_refused_at_patch():
    model = _model()
    model.model.layers[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))     # gpt-oss style
    with pytest.raises(ValueError, match=r"sinks \(layers \[1\]\)"):
        sah.patch(model)
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------ sliding windows
def test_sliding_layers_are_named_once_at_patch():
    gemma3 = _model(family="gemma3", layers=4)
    [message] = _sliding_warnings(lambda: sah.patch(gemma3, FULL, dense_below=0))
    assert "layers [0, 2] of Gemma3ForCausalLM" in message and "window of 48 keys" in message
    assert "while the keys fit the window" in message and "layers [1, 3]" in message
    mistral = _model(family="mistral-window")
    [message] = _sliding_warnings(lambda: sah.patch(mistral))                # default dense_below 4096 > 48
    assert "layers [0, 1]" in message and "never run sparse" in message and "dense_below (4096)" in message
    for family in ("llama", "qwen2", "qwen2-moe"):                          # no window, or full layer types
        assert _sliding_warnings(lambda: sah.patch(_model(family=family))) == []


def test_sliding_layers_run_sparse_while_the_input_fits_the_window(monkeypatch):
    """Within the window a sliding layer is plain causal attention, so the patterns apply there too."""
    model = _model(family="gemma3", layers=2, sliding_window=4096)
    calls = []
    real = prefill.sparse_attention
    monkeypatch.setattr(prefill, "sparse_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    dense = _logits(model, _ids())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sah.patch(model, FULL, dense_below=0, dense_above=1.0)
    torch.testing.assert_close(_logits(model, _ids()), dense, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------ empty budgets
def _minference(entry, layers=2, heads=4):
    return [{str(h): entry for h in range(heads)} for _ in range(layers)]


@pytest.mark.parametrize("config, options, match", [
    (_minference(["vertical_and_slash", 0, 0, 0.9]), {}, r"layer 0, head 0: .*vertical and slash are both 0"),
    (_minference(["stream_llm", 0, 0, 0.9]), {}, r"layer 0, head 0: AShape sink and local are both 0"),
    (_minference(["vertical_and_slash", -5, 100, 0.9]), {}, r"layer 0, head 0: vertical must be >= 0"),
    (sa.AShape(sink=0, local=0), {}, r"AShape sink and local are both 0"),
    (None, {"pattern": sa.AShape(sink=0, local=0)}, r"pattern: AShape sink and local are both 0"),
])
def test_empty_or_negative_budgets_are_refused(tmp_path, config, options, match):
    model = _model()
    if isinstance(config, list):
        path = tmp_path / "heads.json"
        path.write_text(json.dumps(config))
        config = str(path)
    with pytest.raises(ValueError, match=match):
        sah.patch(model, config, **options)
    assert model.config._attn_implementation == "sdpa"
    assert not any(STATE_ATTR in m.__dict__ for m in model.modules())


def test_vertical_slash_without_any_budget_names_both_fields():
    with pytest.raises(ValueError, match=r"vertical and slash are both 0.*give vertical >= 1 or slash >= 1"):
        sa.VerticalSlash(0, 0)
    empty = sa.VerticalSlash(0, 0, sink=0, local=0)          # the empty layout stays a pattern (kernel tests) ...
    model = _model()
    with pytest.raises(ValueError, match="pattern: VerticalSlash vertical and slash are both 0"):
        sah.patch(model, pattern=empty)                      # ... but no model runs it
    with pytest.raises(ValueError, match="layer 0, head 0: VerticalSlash vertical and slash are both 0"):
        sah.patch(model, empty)
    assert sa.VerticalSlash(0, 64, sink=0, local=64).slash == 64          # diagonals only is a real budget


def test_capped_dense_fallback_matches_the_reference():
    """The dense route of a soft-capped model (decode, windowed layers, padding) against the oracle with an explicit
    mask: window 40, a left-padded row, GQA, 65 queries over 113 keys."""
    from sparse_attn.integrations.hf.attention import masked_dense_attention

    gen = torch.Generator().manual_seed(4)
    q = 3 * torch.randn(2, 4, 65, 16, generator=gen)
    k, v = 3 * torch.randn(2, 2, 113, 16, generator=gen), torch.randn(2, 2, 113, 16, generator=gen)
    keep = torch.ones(2, 113, dtype=torch.bool)
    keep[1, :30] = False
    pos = torch.arange(65)[:, None] + 113 - 65
    key = torch.arange(113)[None, :]
    mask = ((key <= pos) & (key > pos - 40))[None, None] & keep[:, None, None, :]
    ref = sa.reference_attention(q, k, v, mask, causal=False, softcap=2.0)
    out = masked_dense_attention(q, k, v, keep, causal=True, window=40, softcap=2.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    uncapped = masked_dense_attention(q, k, v, keep, causal=True, window=40)
    assert (uncapped - ref).abs().max() > 1e-2                     # the cap matters at these scores
