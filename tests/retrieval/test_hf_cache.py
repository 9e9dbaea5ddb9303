"""A tiny Llama's generate() with the retrieval cache: identical tokens to dense when top_k covers the context."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn.integrations.hf.decode_cache import RetrievalCache, register  # noqa: E402


def _tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    return model


def _generate(model, ids, cache=None, new=20):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, cache=cache,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)


@pytest.mark.parametrize("index", ["exact", "query_aware"])
def test_generate_matches_dense_when_top_k_covers_context(index):
    model = _tiny_llama()
    ids = torch.randint(1, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("eager")
    dense = _generate(model, ids)
    model.set_attn_implementation(register())
    if index == "query_aware":
        from sparse_attn.retrieval import QueryAwareIndex
        cache = RetrievalCache(model.config, top_k=128, sink=2, window=8,
                               index=QueryAwareIndex(nlist=4, nprobe=4, train_min=16, tail_max=4))
    else:
        cache = RetrievalCache(model.config, top_k=128, sink=2, window=8, index="exact")
    out = _generate(model, ids, cache)
    assert torch.equal(out, dense)
    layer = cache.layers[0].cache
    assert layer.n_offloaded == 45 + 20 - 1 - 10 and layer.window.k.shape[2] == 10   # most tokens left the window
    assert cache.get_seq_length() == 45 + 19
    report = cache.memory_report()
    assert report["ram_keys"] > 0 and report["device_window"] > 0


def test_small_top_k_runs_and_differs_only_in_retrieval():
    model = _tiny_llama(1)
    model.set_attn_implementation(register())
    ids = torch.randint(1, 97, (1, 60), generator=torch.Generator().manual_seed(2))
    cache = RetrievalCache(model.config, top_k=4, sink=2, window=8)
    out = _generate(model, ids, cache, new=5)
    assert out.shape == (1, 65) and torch.equal(out[:, :60], ids)


def test_cache_arguments():
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        RetrievalCache(num_layers=2, top_k=0)
    with pytest.raises(ValueError, match="num_layers"):
        RetrievalCache(None)
