"""transformers 5.x cache for retrieval decode, and an attention function that uses it.

``RetrievalCache(config, top_k=..., sink=..., window=..., index=..., ssd_dir=...)`` is a
``transformers.cache_utils.Cache`` whose layers (``CacheLayerMixin``) keep sinks + a recent window on the model's
device and move older tokens to the CPU RAM/SSD tiers and the per-KV-head index of a
:class:`~sparse_attn.retrieval.RetrievalKVCache`.  Pass it as ``past_key_values`` to ``model.generate`` (no forward
is rebound).  A layer's ``update`` returns only the tokens it was given, tagged with the layer
(:func:`retrieval_layer_of`), so the attention function can find the cache: transformers passes the ``update``
result straight to the registered attention function.

:func:`retrieval_attention_forward` (an ``AttentionInterface`` function): a prefill whose keys are the whole
context (the first forward) runs :func:`sparse_attn.sparse_prefill` and shows the queries to the index
(attention-aware); every later forward (decode steps, later chunks) runs :func:`retrieval_attention`.
:func:`register` registers it (with the flash-attention mask function, so no ``[Lq, Lk]`` mask is built)."""
from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ...prefill import sparse_prefill
from ...retrieval.attention import retrieval_attention
from ...retrieval.cache import HF_LAYER_TAG as TAG
from ...retrieval.cache import RetrievalKVCache

IMPLEMENTATION = "sparse_attn_retrieval"


class RetrievalLayer(CacheLayerMixin):
    """One attention layer: a :class:`RetrievalKVCache` plus the ``top_k`` its decode steps retrieve."""

    is_sliding = False
    is_croppable = False

    def __init__(self, top_k: int = 100, layer: int = 0, index="auto", **cache_options):
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        self.top_k, self.layer_idx, self.cache_options = top_k, layer, cache_options
        self._index = index                   # a name, or a prototype index that is copied, never used itself
        self.cache = self._new_cache()

    def _new_cache(self) -> RetrievalKVCache:
        index = self._index if isinstance(self._index, str) else copy.deepcopy(self._index)
        return RetrievalKVCache(layer=self.layer_idx, index=index, **self.cache_options)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """``key_states, value_states [B, Hkv, n, D]`` -> the same tensors, the key tagged with this layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache.append(key_states, value_states)
        setattr(key_states, TAG, self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.seq_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache = self._new_cache()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("retrieval decode does not support beam search (reorder_cache)")


class RetrievalCache(Cache):
    """A ``Cache`` of one :class:`RetrievalLayer` per decoder layer of ``config`` (or ``num_layers``)."""

    def __init__(self, config=None, *, num_layers: int | None = None, top_k: int = 100, **cache_options):
        if num_layers is None:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            num_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"config (with num_hidden_layers) or num_layers >= 1 is required, got {num_layers!r}")
        super().__init__(layers=[RetrievalLayer(top_k, layer=i, **cache_options) for i in range(num_layers)])

    def memory_report(self) -> dict:
        """Bytes per tier, summed over layers (see :meth:`RetrievalKVCache.memory_report`)."""
        total: dict = {}
        for layer in self.layers:
            for name, value in layer.cache.memory_report().items():
                total[name] = total.get(name, 0) + value
        return total


def retrieval_layer_of(key) -> RetrievalLayer | None:
    """The :class:`RetrievalLayer` whose ``update`` returned ``key`` (None for other caches)."""
    return getattr(key, TAG, None)


def retrieval_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0, scaling=None,
                                **kwargs):
    """transformers attention function: ``query [B, Hq, Lq, D]``, ``key, value [B, Hkv, n, D]`` (this forward's
    tokens, after RoPE and the cache update) -> ``(out [B, Lq, Hq, D], None)``."""
    if attention_mask is not None and attention_mask.dtype == torch.bool and not bool(attention_mask.all()):
        raise NotImplementedError("retrieval decode does not support padded batches (attention_mask with padding)")
    layer = retrieval_layer_of(key)
    if layer is None or layer.cache.seq_len == key.shape[2]:        # all keys are here: prefill over them
        if layer is not None:
            layer.cache.observe_queries(query)
        out = sparse_prefill(query, key, value, scale=scaling)
    else:
        out = retrieval_attention(query, layer.cache, layer.top_k, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = IMPLEMENTATION) -> str:
    """Register :func:`retrieval_attention_forward` under ``name`` (and the flash-attention mask function, so
    transformers passes no ``[Lq, Lk]`` mask); then ``model.set_attn_implementation(name)``."""
    from .registry import register_attention
    return register_attention(name, retrieval_attention_forward)
