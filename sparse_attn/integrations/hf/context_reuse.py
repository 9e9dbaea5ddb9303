"""Reuse of a prefilled context across requests with transformers models: save a cache's KV, restore it into a
new request's cache, and prefill only the request's own suffix.

    import sparse_attn.hf as sah
    catalogue = sparse_attn.retrieval.ContextCatalogue("contexts/", max_bytes=50 << 30)
    out = model(ids, use_cache=True)                         # the first request: a full prefill
    sah.save_context(model, out.cache, ids, catalogue)       # (out.past_key_values in older transformers)
    ...
    restored = sah.reuse_context(model, new_ids, catalogue)  # a later request starting with those tokens
    if restored is not None:
        logits = model(new_ids[:, restored.tokens:], cache=restored.cache).logits

``into="dynamic"`` restores the full KV into a ``DynamicCache`` (any attention implementation: sdpa, eager, a
model patched by `sparse_attn.hf.patch`: the suffix's queries attend to context + suffix, bottom-right aligned);
``into="retrieval"`` restores a `RetrievalCache` (sinks + window on the device, keys in RAM, values left in the
saved files on SSD) for a model using the retrieval attention function.  Another model's context, other tokens or
a damaged file are refused (`SavedContextMismatchError`, `KVFileError`) before a cache is returned (value pages
left on SSD are checked when read)."""
from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import torch

from ...errors import InvalidArgumentError, InvalidTypeError, NotSupportedError
from ...retrieval.context_catalogue import ContextCatalogue
from ...retrieval.saved_context import (check_context, identity_key, open_context_cache, read_context_info,
                                        read_context_kv, save_context_kv, token_list)

INTO = ("dynamic", "retrieval")


class RestoredContext(NamedTuple):
    """``cache``: the new request's cache holding the restored context; ``tokens``: how many leading tokens of
    the request it holds (prefill ``input_ids[:, tokens:]`` with it)."""

    cache: object
    tokens: int


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _weights_fingerprint(model, samples: int = 64) -> str:
    """sha256 over every parameter's name, shape, dtype and ``samples`` evenly spaced values: two checkpoints of
    one architecture differ here (a sample, not a full hash: it costs microseconds per parameter)."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        digest.update(flat[idx].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def model_identity(model) -> dict:
    """What a saved context's KV depends on: architecture, layer/head counts, head dim, dtype, RoPE settings,
    attention windows, and a fingerprint of the weights."""
    text = _text_config(model)
    heads = text.num_attention_heads
    param = next(model.parameters())
    rope = {name: getattr(text, name) for name in ("rope_theta", "rope_scaling", "rope_parameters",
                                                   "partial_rotary_factor", "max_position_embeddings")
            if getattr(text, name, None) is not None}
    return {"architecture": type(model).__name__, "model_type": getattr(text, "model_type", None),
            "layers": text.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads, "hidden_size": text.hidden_size,
            "dtype": str(param.dtype).replace("torch.", ""), "rope": rope,
            "sliding_window": getattr(text, "sliding_window", None), "layer_types": getattr(text, "layer_types", None),
            "weights": _weights_fingerprint(model)}


def _cache_layers(cache) -> list:
    """Per layer: a ``(k, v)`` pair of a ``DynamicCache``, or the `RetrievalKVCache` of a `RetrievalCache`."""
    from .decode_cache import RetrievalLayer

    layers = getattr(cache, "layers", None)
    if not layers:
        raise InvalidTypeError(f"cache must be a transformers DynamicCache or a RetrievalCache holding the "
                               f"context, got {type(cache).__name__}")
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, RetrievalLayer):
            out.append(layer.cache)
        elif getattr(layer, "is_sliding", False) or type(layer).__name__ != "DynamicLayer":
            raise NotSupportedError(f"cache: layer {i} is a {type(layer).__name__}; saved contexts hold the full KV "
                                    f"of DynamicLayer or RetrievalLayer layers only (no sliding-window or static "
                                    f"layers)")
        else:
            out.append((layer.keys, layer.values))
    return out


def save_context(model, cache, input_ids, directory, *, sink: int = 128, window: int = 512, page_tokens: int = 16,
                 storage_dtype=None) -> str:
    """Save ``cache`` (a ``DynamicCache`` or `RetrievalCache` that holds exactly the tokens ``input_ids``, ``[1, n]``
    or ``[n]``, e.g. ``model(input_ids, use_cache=True).cache``) with ``model``'s identity.

    ``directory``: a directory path, or a :class:`~sparse_attn.retrieval.ContextCatalogue` (a new directory under
    its root, registered, then the catalogue evicts by size).  ``sink``/``window``: how a retrieval restore
    splits the full KV of a ``DynamicCache`` (a `RetrievalCache` keeps its own split and index);
    ``page_tokens``: SSD page size; ``storage_dtype``: dtype of the offloaded KV (default the cache's; lower is
    lossy).  Returns the context's directory."""
    ids = token_list(input_ids, "input_ids")
    identity = model_identity(model)
    layers = _cache_layers(cache)
    if len(layers) != identity["layers"]:
        raise InvalidArgumentError(f"cache has {len(layers)} layers, the model {identity['layers']}")
    catalogue = directory if isinstance(directory, ContextCatalogue) else None
    target = catalogue.new_directory() if catalogue is not None else directory
    save_context_kv(target, layers, ids, identity, sink=sink, window=window, page_tokens=page_tokens,
                    storage_dtype=storage_dtype)
    if catalogue is not None:
        catalogue.add(target, ids, identity_key(identity))
    return os.fspath(target)


def restore_context(model, directory, input_ids, *, tokens: int | None = None, into: str = "dynamic",
                    top_k: int = 100, index=None, scratch_dir=None, cache_pages: int = 4096) -> RestoredContext:
    """Restore the context saved in ``directory`` for a request ``input_ids`` (``[1, n]`` or ``[n]``) that starts
    with its tokens (the first ``tokens`` of them, default all).  Refuses, before restoring anything, a context
    of another model (:class:`~sparse_attn.errors.SavedContextMismatchError` naming the differing fields), of
    other tokens (naming the first differing position), or with a damaged file
    (:class:`~sparse_attn.retrieval.KVFileError`; the value pages a retrieval restore leaves on disk are checked
    when retrieval reads them).

    ``into="dynamic"``: a ``DynamicCache`` with the full KV on the model's device.  ``into="retrieval"``: a
    `RetrievalCache` (``top_k`` keys retrieved per query row; ``index`` None = the saved index, or a name to build)
    whose values stay in the saved files; ``scratch_dir`` (required; one per live request) receives the request's
    own offloaded tokens (the saved files are never written).  Returns ``(cache, tokens)``."""
    if into not in INTO:
        raise InvalidArgumentError(f"into must be one of {INTO}, got {into!r}")
    info = read_context_info(directory)
    tokens = check_context(info, model_identity(model), input_ids, tokens, directory)
    param = next(model.parameters())
    if into == "dynamic":
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for i in range(info["layers"]):
            k, v, _ = read_context_kv(directory, i)
            to_model = dict(device=param.device, dtype=param.dtype)
            cache.update(k[:, :, :tokens].to(**to_model), v[:, :, :tokens].to(**to_model), i)
        return RestoredContext(cache, tokens)
    if scratch_dir is None:
        raise InvalidArgumentError("scratch_dir is required with into='retrieval': a writable directory for the "
                                   "request's own offloaded tokens (the saved files stay read-only)")
    from .decode_cache import RetrievalCache

    cache = RetrievalCache(model.config, top_k=top_k, ssd_dir=scratch_dir)
    for i, layer in enumerate(cache.layers):
        layer.cache = open_context_cache(directory, i, scratch_dir=scratch_dir, tokens=tokens, index=index,
                                         cache_pages=cache_pages, device=param.device)
        layer.device, layer.dtype, layer.is_initialized = param.device, param.dtype, True
    return RestoredContext(cache, tokens)


def reuse_context(model, input_ids, catalogue: ContextCatalogue, **restore_options) -> RestoredContext | None:
    """Restore the saved context of ``model`` in ``catalogue`` sharing the longest prefix with ``input_ids``
    (at most all but the last token, so the request has a suffix to prefill), or None when none does.
    ``restore_options`` as in :func:`restore_context`."""
    if not isinstance(catalogue, ContextCatalogue):
        raise InvalidTypeError(f"catalogue must be a ContextCatalogue, got {type(catalogue).__name__}")
    ids = token_list(input_ids, "input_ids")
    match = catalogue.lookup(ids, identity_key(model_identity(model)))
    if match is None or min(match.tokens, len(ids) - 1) < 1:
        return None
    return restore_context(model, match.directory, ids, tokens=min(match.tokens, len(ids) - 1), **restore_options)
