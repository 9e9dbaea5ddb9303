"""transformers 5.x cache for retrieval decode.

``RetrievalCache(config, top_k=..., sink=..., window=..., index=..., ssd_dir=...)`` is a
``transformers.cache_utils.Cache`` whose layers (``CacheLayerMixin``) keep sinks + a recent window on the model's
device and move older tokens to the CPU RAM/SSD tiers and the per-KV-head index of a
:class:`~sparse_attn.retrieval.RetrievalKVCache`.  Pass it as ``past_key_values`` (``cache`` on recent 5.x) to
``model.generate`` (no forward is rebound).  A layer's ``update`` returns only the tokens it was given and notes
itself for the attention call that follows (`retrieval_link`), so the one attention function of the package
(`attention.sparse_attention_forward`) finds the cache: the prompt (all keys present) runs the sparse prefill and
shows its queries to the index (attention-aware), every later forward runs :func:`retrieval_attention`.

:func:`register` and :data:`IMPLEMENTATION` name that same function and registration (``sparse_attn.hf.patch`` uses
them too); a model switched to it by hand, without ``patch``, runs the online defaults."""
from __future__ import annotations

import copy

from transformers.cache_utils import Cache, CacheLayerMixin

from ...retrieval.cache import RetrievalKVCache
from .attention import register_under
from .attention import sparse_attention_forward
from .retrieval_link import note_updated_layer
from ...errors import InvalidArgumentError

#: The package's one attention implementation name (the same as ``sparse_attn.hf.IMPLEMENTATION``).
IMPLEMENTATION = "sparse_attn"
#: Former name of the retrieval attention function: it is the package's one attention function now.
retrieval_attention_forward = sparse_attention_forward


class RetrievalLayer(CacheLayerMixin):
    """One attention layer: a :class:`RetrievalKVCache` plus the ``top_k`` its decode steps retrieve."""

    is_sliding = False
    is_croppable = False

    def __init__(self, top_k: int = 100, layer: int = 0, index="auto", **cache_options):
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise InvalidArgumentError(f"top_k must be a positive int, got {top_k!r}")
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
        """``key_states, value_states [B, Hkv, n, D]`` -> the same tensors; notes this layer for the attention
        call that follows (`retrieval_link`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache.append(key_states, value_states)
        note_updated_layer(self, key_states)
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
            raise InvalidArgumentError(f"config (with num_hidden_layers) or num_layers >= 1 is required, got {num_layers!r}")
        super().__init__(layers=[RetrievalLayer(top_k, layer=i, **cache_options) for i in range(num_layers)])

    def memory_report(self) -> dict:
        """Bytes per tier, summed over layers (see :meth:`RetrievalKVCache.memory_report`)."""
        total: dict = {}
        for layer in self.layers:
            for name, value in layer.cache.memory_report().items():
                total[name] = total.get(name, 0) + value
        return total


def register(name: str = IMPLEMENTATION) -> str:
    """Register the package's attention function under ``name`` (default: the one ``sparse_attn.hf.patch`` uses)
    and its key-padding mask function; then ``model.set_attn_implementation(name)``."""
    return register_under(name)
