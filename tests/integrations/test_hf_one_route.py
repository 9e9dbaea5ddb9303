"""One Hugging Face attention function and registration: the retrieval cache is found through the note its
``update`` leaves (not an attribute on the key tensor, which a copy loses), `decode_cache.register` is the patch's
registration, and a model switched to the name by hand runs the online defaults."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="needs transformers 5.x").CacheLayerMixin

import sparse_attn as sa  # noqa: E402
import sparse_attn.hf as sah  # noqa: E402
import sparse_attn.retrieval.attention as retrieval_attention_module  # noqa: E402
from sparse_attn.integrations.hf import attention as hf_attention  # noqa: E402
from sparse_attn.integrations.hf import decode_cache, retrieval_link  # noqa: E402
from sparse_attn.tools.tiny_model import tiny_llama  # noqa: E402


def _generate(model, ids, cache=None, new=8):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, cache=cache,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)


def test_retrieval_cache_is_found_when_the_key_is_copied_after_update(monkeypatch):
    model = tiny_llama(hidden=64, vocab=97, max_positions=512)
    ids = torch.randint(1, 97, (1, 90), generator=torch.Generator().manual_seed(1))
    dense = _generate(model, ids)
    update = decode_cache.RetrievalLayer.update
    # a model (or a wrapper) that copies the keys between the cache update and the attention call
    monkeypatch.setattr(decode_cache.RetrievalLayer, "update",
                        lambda self, k, v, *a, **kw: tuple(t.clone() for t in update(self, k, v, *a, **kw)))
    calls = []
    real = retrieval_attention_module.retrieval_attention
    monkeypatch.setattr(retrieval_attention_module, "retrieval_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    sah.patch(model, sa.VerticalSlash(vertical=10**6, slash=10**6), dense_below=0,
              retrieval={"top_k": 256, "sink": 4, "window": 16, "index": "exact"})
    out = _generate(model, ids, sah.retrieval_cache(model))
    assert len(calls) == 2 * 7                               # every decode step of both layers retrieved
    assert torch.equal(out, dense)


def test_a_note_is_used_once_and_only_for_a_key_of_its_shape():
    layer = decode_cache.RetrievalLayer(top_k=4, sink=1, window=2)
    key = torch.zeros(1, 2, 5, 8)
    retrieval_link.note_updated_layer(layer, key)
    assert retrieval_link.take_updated_layer(key.to(torch.float64)) is layer     # a cast keeps the shape
    assert retrieval_link.take_updated_layer(key) is None                        # consumed
    retrieval_link.note_updated_layer(layer, key)
    assert retrieval_link.take_updated_layer(torch.zeros(1, 2, 6, 8)) is None     # another call's key
    assert retrieval_link.take_updated_layer(key) is None                        # a stale note is dropped


def test_decode_cache_register_is_the_patch_registration():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert decode_cache.register() == sah.IMPLEMENTATION == decode_cache.IMPLEMENTATION
    assert AttentionInterface()[sah.IMPLEMENTATION] is hf_attention.sparse_attention_forward
    assert AttentionMaskInterface()[sah.IMPLEMENTATION] is hf_attention.key_padding_mask
    assert decode_cache.retrieval_attention_forward is hf_attention.sparse_attention_forward


def test_a_model_switched_by_hand_runs_the_online_defaults(monkeypatch):
    model = tiny_llama(hidden=64, vocab=97, max_positions=512)
    ids = torch.randint(1, 97, (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(ids).logits
    states = []
    real = hf_attention.prefill_route
    monkeypatch.setattr(hf_attention, "prefill_route", lambda state, *a, **kw: states.append(state) or real(state, *a, **kw))
    model.set_attn_implementation(decode_cache.register())
    with torch.no_grad():
        out = model(ids).logits
    assert len(states) == 2                                  # both layers took the sparse prefill route
    for state in states:
        assert state.config is None and state.options["pattern"] is None
        assert state.options["dense_above"] == sah.ONLINE_DENSE_ABOVE
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)        # 70 keys: below dense_below, dense
