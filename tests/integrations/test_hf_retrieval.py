"""patch(model, retrieval=...): the prompt runs sparse prefill, later steps retrieval decode (transformers 5.x)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="needs transformers 5.x").CacheLayerMixin

import sparse_attn.hf as sah  # noqa: E402
import sparse_attn.retrieval.attention as retrieval_attention_module  # noqa: E402
from sparse_attn import VerticalSlash  # noqa: E402

FULL = VerticalSlash(vertical=10**6, slash=10**6, last_q=16)


def _tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _generate(model, ids, cache=None, new=12):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, cache=cache,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)


def test_retrieval_covering_the_context_generates_the_dense_tokens(monkeypatch):
    model = _tiny_llama()
    ids = torch.randint(1, 97, (1, 150), generator=torch.Generator().manual_seed(1))
    dense = _generate(model, ids)
    calls = []
    real = retrieval_attention_module.retrieval_attention
    monkeypatch.setattr(retrieval_attention_module, "retrieval_attention",
                        lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    sah.patch(model, FULL, dense_below=0, retrieval={"top_k": 512, "sink": 4, "window": 16})
    cache = sah.retrieval_cache(model)
    out = _generate(model, ids, cache)
    assert torch.equal(out, dense)
    assert len(calls) == 2 * 11 and set(calls) == {512}          # every decode step of both layers retrieved
    assert cache.layers[0].cache.n_offloaded == 150 + 11 - 20       # all but sinks + window left the device
    sah.unpatch(model)
    assert torch.equal(_generate(model, ids), dense)


def test_small_top_k_changes_only_decode():
    model = _tiny_llama(1)
    ids = torch.randint(1, 97, (1, 120), generator=torch.Generator().manual_seed(2))
    sah.patch(model, FULL, dense_below=0, retrieval={"top_k": 2, "sink": 2, "window": 4})
    with torch.no_grad():
        first = model(ids, cache=sah.retrieval_cache(model)).logits
    sah.unpatch(model)
    with torch.no_grad():
        dense = model(ids).logits
    torch.testing.assert_close(first, dense, rtol=1e-4, atol=1e-4)    # the prompt itself is exact


def test_bad_retrieval_options_leave_the_model_unchanged():
    model = _tiny_llama()
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="top_k"):
        sah.patch(model, retrieval={"top_k": 0})
    with pytest.raises(TypeError, match="retrieval"):
        sah.patch(model, retrieval={"no_such_option": 1})
    with pytest.raises(TypeError, match="retrieval must be None or a dict"):
        sah.patch(model, retrieval=5)
    assert model.config._attn_implementation == before and not sah.is_patched(model)
    with pytest.raises(ValueError, match="not patched with retrieval"):
        sah.retrieval_cache(model)
    sah.patch(model)
    with pytest.raises(ValueError, match="not patched with retrieval"):
        sah.retrieval_cache(model)
