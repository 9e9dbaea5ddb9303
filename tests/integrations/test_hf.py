"""Hugging Face integration (`sparse_attn.hf`): tiny random-weight Llama / Mistral / Qwen2 / Phi-3 models, patched
versus the same model with transformers' `sdpa` attention (the dense oracle at model level), and the masked dense
fallback against `reference_attention` with an explicit mask."""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_attn as sa  # noqa: E402
import sparse_attn.config  # noqa: E402,F401
import sparse_attn.hf as sah  # noqa: E402
from sparse_attn import prefill  # noqa: E402
from sparse_attn.integrations.hf.attention import STATE_ATTR, masked_dense_attention  # noqa: E402

VOCAB, L = 128, 200          # L is not a multiple of the 64-row blocks
HEADS, KV_HEADS, LAYERS = 4, 2, 2
FULL = sa.VerticalSlash(vertical=10**6, slash=10**6)     # a budget that covers every key
SPARSE = sa.VerticalSlash(vertical=8, slash=64, sink=4, local=16)   # a real budget at L=200


def _small(cls_name, **extra):
    config_cls = getattr(transformers, cls_name + "Config")
    model_cls = getattr(transformers, cls_name + "ForCausalLM")
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                        pad_token_id=0, **extra)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(config).eval()


ARCHS = {
    "llama": lambda: _small("Llama"),
    "mistral": lambda: _small("Mistral", sliding_window=None),
    "qwen2": lambda: _small("Qwen2"),
    "phi3": lambda: _small("Phi3"),
}


def _ids(batch=1, length=L, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _padded_batch():
    """Two different rows, the second left-padded by 37 tokens."""
    ids = _ids(2, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    ids[1, :37] = 0
    return ids, mask


@torch.no_grad()
def _logits(model, ids, mask=None):
    return model(ids, attention_mask=mask).logits


def _assert_unchanged(model, before_logits, ids):
    assert model.config._attn_implementation == "sdpa"
    assert not any(STATE_ATTR in m.__dict__ for m in model.modules())
    assert torch.equal(_logits(model, ids), before_logits)


# ------------------------------------------------------------------------------------ full budget == dense
@pytest.mark.parametrize("arch", ARCHS)
def test_full_budget_equals_dense(arch):
    model = ARCHS[arch]()
    single, (batch, mask) = _ids(), _padded_batch()
    dense_single, dense_batch = _logits(model, single), _logits(model, batch, mask)
    sah.patch(model, FULL, dense_below=0, dense_above=1.0)
    assert model.config._attn_implementation == sah.IMPLEMENTATION
    torch.testing.assert_close(_logits(model, single), dense_single, rtol=1e-4, atol=1e-4)
    keep = mask.bool()
    torch.testing.assert_close(_logits(model, batch, mask)[keep], dense_batch[keep], rtol=1e-4, atol=1e-4)


def test_mixed_per_head_full_budgets_equal_dense():
    """One pattern family per head (grouped estimation, heads put back in order), all covering everything."""
    model = ARCHS["llama"]()
    ids = _ids()
    dense = _logits(model, ids)
    heads = [FULL, sa.AShape(sink=10**6, local=10**6), sa.Dense(), sa.BlockSparse(top_k=10**6)]
    sah.patch(model, heads, dense_below=0, dense_above=1.0)
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)


def test_sliding_window_layers_equal_dense():
    """A Mistral window shorter than the prompt: exact windowed attention (single row and left-padded batch)."""
    model = _small("Mistral", sliding_window=48)
    (batch, mask), single = _padded_batch(), _ids()
    dense_single, dense_batch = _logits(model, single), _logits(model, batch, mask)
    sah.patch(model, FULL, dense_below=0, dense_above=1.0)
    torch.testing.assert_close(_logits(model, single), dense_single, rtol=1e-4, atol=1e-4)
    keep = mask.bool()
    torch.testing.assert_close(_logits(model, batch, mask)[keep], dense_batch[keep], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ the sparse path runs
def _spy_sparse_attention(monkeypatch):
    calls = []
    real = prefill.sparse_attention

    def spy(q, k, v, layout, **kw):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, layout, **kw)

    monkeypatch.setattr(prefill, "sparse_attention", spy)
    return calls


def test_real_budget_runs_the_sparse_kernel(monkeypatch):
    model = ARCHS["qwen2"]()
    ids = _ids()
    dense = _logits(model, ids)
    calls = _spy_sparse_attention(monkeypatch)
    sah.patch(model, SPARSE, dense_below=0, dense_above=1.0)
    out = _logits(model, ids)
    assert calls == [((1, HEADS, L, 16), (1, KV_HEADS, L, 16))] * LAYERS     # KV heads not repeated
    assert torch.isfinite(out).all()
    assert (out - dense).abs().max() > 1e-3
    # A left-padded batch runs row by row over each row's own keys (not the dense fallback).
    calls.clear()
    batch, mask = _padded_batch()
    assert torch.isfinite(_logits(model, batch, mask)).all()
    assert [(q[2], k[2]) for q, k in calls] == [(L, L), (L - 37, L - 37)] * LAYERS


def test_dense_above_runs_dense_layouts_densely(monkeypatch):
    """A layout denser than dense_above runs dense attention (exact), never the sparse kernel."""
    model = ARCHS["llama"]()
    ids = _ids()
    dense = _logits(model, ids)
    calls = _spy_sparse_attention(monkeypatch)
    sah.patch(model, FULL, dense_below=0, dense_above=0.5)
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)
    assert calls == []


def test_dense_below_and_decode_skip_the_sparse_path(monkeypatch):
    """Decode steps (one query) never reach the estimator; prompts under dense_below never do either."""
    model = ARCHS["llama"]()
    query_lengths = []
    real_estimate = prefill.estimate
    monkeypatch.setattr(prefill, "estimate",
                        lambda q, *a, **k: query_lengths.append(q.shape[2]) or real_estimate(q, *a, **k))
    calls = _spy_sparse_attention(monkeypatch)
    sah.patch(model, SPARSE, dense_above=1.0)               # default dense_below (4096) > 50
    with torch.no_grad():
        model.generate(_ids(length=50), max_new_tokens=3, do_sample=False)
    assert query_lengths == [] and calls == []
    sah.patch(model, SPARSE, dense_below=40, dense_above=1.0)
    with torch.no_grad():
        model.generate(_ids(length=50), max_new_tokens=3, do_sample=False)
    assert query_lengths == [50] * LAYERS and len(calls) == LAYERS


def test_on_layout_reports_densities():
    model = ARCHS["llama"]()
    seen = []
    sah.patch(model, SPARSE, dense_below=0, on_layout=lambda layer, layout, density: seen.append((layer, density)))
    _logits(model, _ids())
    assert [layer for layer, _ in seen] == list(range(LAYERS))
    assert all(0 < d < 1 for _, d in seen)


# ------------------------------------------------------------------------------------ generate, unpatch, chunks
@pytest.mark.parametrize("padded", [False, True], ids=["single", "left_padded"])
def test_generate_and_unpatch_restore_outputs(padded):
    model = ARCHS["llama"]()
    ids, mask = _padded_batch() if padded else (_ids(), None)
    before = _logits(model, ids, mask)
    with torch.no_grad():
        dense_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        sah.patch(model, FULL, dense_below=0, dense_above=1.0)
        sparse_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        sah.patch(model, SPARSE, dense_below=0, dense_above=1.0)                              # patching twice is safe
        sparse_real = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(sparse_tokens, dense_tokens)
    assert sparse_real.shape == dense_tokens.shape
    sah.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert not sah.is_patched(model)
    assert torch.equal(_logits(model, ids, mask), before)
    sah.unpatch(model)                                                       # unpatching twice is a no-op


def test_unpatch_restores_eager():
    model = ARCHS["phi3"]()
    model.set_attn_implementation("eager")
    sah.patch(model)
    sah.unpatch(model)
    assert model.config._attn_implementation == "eager"


def test_chunked_prefill_equals_dense():
    """The prompt in two forward calls through a DynamicCache: the second chunk has 80 queries over 200 keys."""
    model = ARCHS["mistral"]()
    ids = _ids()
    dense = _logits(model, ids)
    sah.patch(model, FULL, dense_below=0, dense_above=1.0)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(ids[:, :120], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 120:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], 1), dense, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ bad input
def test_bad_models_are_rejected():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        sah.patch(torch.nn.Linear(2, 2))

    class NoRegistry(transformers.LlamaForCausalLM):
        _supports_attention_backend = False

    model = _small("Llama")
    bad = NoRegistry(model.config).eval()
    with pytest.raises(ValueError, match="attention registry"):
        sah.patch(bad)
    assert bad.config._attn_implementation == "sdpa" and not sah.is_patched(bad)


@pytest.mark.parametrize("config, options, error, match", [
    ([FULL] * (HEADS - 1), {}, ValueError, "head"),
    (sa.config.SparseConfig.uniform(FULL, LAYERS + 1, HEADS), {}, ValueError, "layers"),
    ({"format": "sparse_attn.config", "version": 1, "num_layers": LAYERS, "num_heads": HEADS,
      "layers": [[{"pattern": "no_such_pattern"}] * HEADS] * LAYERS}, {}, ValueError, "unknown pattern"),
    ([[0, "vertical_and_slash"]], {}, ValueError, "config"),
    (42, {}, TypeError, "config"),
    (None, {"dense_below": -1}, ValueError, "dense_below"),
    (None, {"backend": "nope"}, ValueError, "backend"),
    (None, {"dense_above": 0}, ValueError, "dense_above"),
    (None, {"pattern": "vertical_slash"}, ValueError, "pattern"),
    (None, {"no_such_option": 1}, TypeError, "no_such_option"),
    (FULL, {"pattern": FULL}, ValueError, "either config or the pattern"),
])
def test_bad_config_or_options_leave_model_unchanged(config, options, error, match):
    model = ARCHS["llama"]()
    ids = _ids(length=70)
    before = _logits(model, ids)
    with pytest.raises(error, match=match):
        sah.patch(model, config, **options)
    _assert_unchanged(model, before, ids)


def test_bad_patch_of_a_patched_model_keeps_the_patch():
    model = ARCHS["llama"]()
    sah.patch(model, FULL)
    state = getattr(model, STATE_ATTR)
    with pytest.raises(ValueError):
        sah.patch(model, FULL, dense_below=-5)
    assert getattr(model, STATE_ATTR) is state and model.config._attn_implementation == sah.IMPLEMENTATION
    sah.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_import_sparse_attn_does_not_import_transformers():
    """``import sparse_attn`` never imports transformers; ``sparse_attn.hf`` registers our name in it (so
    from_pretrained(attn_implementation="sparse_attn") works) and still imports where transformers is missing."""
    code = "import sys, sparse_attn; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys; sys.modules['transformers'] = None; import sparse_attn.hf as sah, torch\n"
            "try:\n    sah.patch(torch.nn.Linear(1, 1))\nexcept ImportError as e:\n    assert 'pip install' in str(e)\n"
            "else:\n    raise AssertionError('no ImportError')")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------ masked dense fallback
@pytest.mark.parametrize("Lq, Lk, window", [(113, 113, None), (65, 113, 40), (1, 63, None), (113, 113, 1)])
def test_masked_dense_matches_reference(Lq, Lk, window):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, Lq, 16, generator=gen)
    k, v = torch.randn(2, 2, Lk, 16, generator=gen), torch.randn(2, 2, Lk, 16, generator=gen)
    keep = torch.ones(2, Lk, dtype=torch.bool)
    keep[1, :30] = False                                                      # left padding in row 1
    keep[0, 5] = False                                                        # a hole in row 0
    pos = torch.arange(Lq)[:, None] + Lk - Lq
    key = torch.arange(Lk)[None, :]
    mask = (key <= pos) & (key > pos - (window or Lk + 1))
    mask = mask[None, None] & keep[:, None, None, :]
    ref = sa.reference_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask, causal=False)
    out = masked_dense_attention(q, k, v, keep, causal=True, window=window)
    sees = mask.any(-1)
    torch.testing.assert_close(out[sees.expand_as(out[..., 0])], ref[sees.expand_as(ref[..., 0])],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~sees.expand_as(out[..., 0])], torch.zeros_like(out[~sees.expand_as(out[..., 0])]))


# ------------------------------------------------------------------------------------ configs from files
def test_minference_json_drives_patch(tmp_path):
    """A MInference / vLLM `sparse_attention_config` ([{head: [type, vertical, slash, score]}] per layer) loads from
    a file; with budgets covering everything the patched model equals dense."""
    import json

    model = ARCHS["llama"]()
    ids = _ids()
    dense = _logits(model, ids)
    layer = {str(h): ["vertical_and_slash", 10**6, 10**6, 0.9] for h in range(HEADS)}
    path = tmp_path / "minference.json"
    path.write_text(json.dumps([layer] * LAYERS))
    sah.patch(model, str(path), dense_below=0, dense_above=1.0)
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)


def test_calibrated_config_drives_patch(tmp_path, monkeypatch):
    from sparse_attn.tools.calibrate import calibrate_model
    from sparse_attn.config import SparseConfig

    model = ARCHS["llama"]()
    ids = _ids()
    result = calibrate_model(model, ids, target=0.5, progress=False)
    result.config.save(tmp_path / "calibrated.json")
    config = SparseConfig.load(tmp_path / "calibrated.json")
    used = []
    real_estimate = prefill.estimate
    monkeypatch.setattr(prefill, "estimate", lambda q, k, patterns, **kw: used.append(patterns) or
                        real_estimate(q, k, patterns, **kw))
    sah.patch(model, tmp_path / "calibrated.json", dense_below=0, dense_above=1.0)
    assert torch.isfinite(_logits(model, ids)).all()
    expected = [config.patterns_for_layer(i, L) for i in range(LAYERS)]
    assert used == [p for p in expected if p is not None and not all(isinstance(h, sa.Dense) for h in p)]
    assert used, "calibration at target 0.5 should pick some sparse heads"


def test_diffuse_attention_skips_the_gamma_estimate(monkeypatch):
    """Cumulative-mass patterns on diffuse (random-weight) attention: the cheap mass check picks exact dense
    attention before the full estimate; peaked attention passes the check."""
    from sparse_attn.integrations.hf.attention import _mass_needs_dense

    model = ARCHS["llama"]()
    ids = _ids()
    dense = _logits(model, ids)
    estimates = []
    real_estimate = prefill.estimate
    monkeypatch.setattr(prefill, "estimate", lambda *a, **k: estimates.append(1) or real_estimate(*a, **k))
    sah.patch(model, sa.VerticalSlash(gamma=0.95), dense_below=0, dense_above=0.3)
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-4, atol=1e-4)
    assert estimates == []

    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 300, 16, generator=gen)
    q = torch.randn(1, 4, 300, 16, generator=gen)
    q[:, :, :] = 30 * k[:, :1, 5:6]                      # every query attends to key 5 (a sink) and little else
    pattern = [sa.VerticalSlash(gamma=0.9)] * 4
    assert not _mass_needs_dense(q, k, pattern, None, 0.3)
    assert _mass_needs_dense(torch.zeros_like(q), k, pattern, None, 0.3)     # uniform attention
    assert not _mass_needs_dense(torch.zeros_like(q), k, [sa.VerticalSlash(vertical=64, slash=64)] * 4, None, 0.3)


def test_dense_above_defaults_guard_online_patterns_and_honour_configs():
    model = ARCHS["llama"]()
    sah.patch(model)
    assert getattr(model, STATE_ATTR).options["dense_above"] == sah.ONLINE_DENSE_ABOVE
    sah.patch(model, SPARSE)
    assert getattr(model, STATE_ATTR).options["dense_above"] == 1.0
    sah.patch(model, SPARSE, dense_above=0.5)
    assert getattr(model, STATE_ATTR).options["dense_above"] == 0.5
