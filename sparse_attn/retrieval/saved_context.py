"""Saved contexts: the KV of a prefilled token sequence, every layer and KV head, kept on disk for later requests
that start with the same tokens (turns of one conversation, questions over one document).

A context directory holds, per layer, exactly what :meth:`RetrievalKVCache.close` writes (checksummed page files of
the offloaded keys and values, the sinks + recent window, the retrieval index, checksummed metadata: one file
format for the SSD tier and for saved contexts), and ``context.json`` (checksummed, written last): the model's
identity (a dict the caller builds, e.g. `sparse_attn.integrations.hf.context_reuse.model_identity`), the token ids
and their sha256.  Restoring checks the identity and the token ids and refuses with
:class:`~sparse_attn.errors.SavedContextMismatchError`; a damaged file raises :class:`~.page_file.KVFileError`.
It restores either the full KV (:func:`read_context_kv`) or a :class:`RetrievalKVCache` that reads the saved files
in place and leaves the values on disk (:func:`open_context_cache`)."""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import torch

from ..errors import InvalidArgumentError, InvalidTypeError, SavedContextMismatchError
from .cache import RetrievalKVCache, read_layer_meta, read_window, write_layer_state
from .checked_json import read_checked_json, write_checked_json
from .index_exact import ExactIndex
from .page_file import KVFileError, PagedVectorFile, check_writable_dir
from .window import DeviceWindow

FORMAT, VERSION = "sparse_attn.saved_context", 1
CONTEXT_FILE = "context.json"


def token_list(token_ids, name: str = "token_ids") -> list:
    """``token_ids`` (a sequence of ints, a 1-D tensor, or a ``[1, n]`` tensor) as a list of Python ints."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() == 2 and token_ids.shape[0] == 1:
            token_ids = token_ids[0]
        if token_ids.dim() != 1 or token_ids.is_floating_point():
            raise InvalidArgumentError(f"{name} must be integer ids of one sequence ([n] or [1, n]), got "
                                       f"{token_ids.dtype} {tuple(token_ids.shape)}")
        return token_ids.tolist()
    try:
        ids = [int(t) for t in token_ids]
    except (TypeError, ValueError):
        raise InvalidTypeError(f"{name} must be a sequence of ints or an integer tensor, got "
                               f"{type(token_ids).__name__}") from None
    return ids


def tokens_sha256(ids) -> str:
    """sha256 of the token ids as little-endian int64 (the hash a saved context records)."""
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


def _canonical(identity: dict) -> dict:
    """``identity`` as JSON would give it back (tuples become lists, keys strings), so saved == current compares."""
    if not isinstance(identity, dict):
        raise InvalidTypeError(f"identity must be a dict, got {type(identity).__name__}")
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def identity_key(identity: dict) -> str:
    """A short hash of ``identity`` (the catalogue files contexts by it)."""
    return hashlib.sha256(json.dumps(_canonical(identity), sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------- saving
def _layer_state(layer, sink: int, window: int, storage_dtype):
    """``(window, offloaded keys [S, n, D], offloaded values, index, n_indexed)`` of one layer given as a
    ``(k, v)`` pair ``[1, Hkv, n, D]`` (split like a retrieval cache with ``sink``/``window`` would) or as a
    live :class:`RetrievalKVCache` (its own split, its index as it is: nothing of it changes)."""
    if isinstance(layer, RetrievalKVCache):
        if layer.dim is None:
            raise InvalidArgumentError("layers: a RetrievalKVCache is empty; prefill it first")
        values = layer.ram_values.view() if layer.ram_values is not None else layer.ssd_values.read_all()
        return layer.window, layer.ram_keys.view(), values, layer.index, layer.n_indexed
    if not (isinstance(layer, (tuple, list)) and len(layer) == 2 and all(isinstance(t, torch.Tensor) for t in layer)):
        raise InvalidTypeError(f"layers: each layer must be a (keys, values) pair of tensors or a RetrievalKVCache, "
                               f"got {type(layer).__name__}")
    k, v = layer
    if k.dim() != 4 or k.shape != v.shape:
        raise InvalidArgumentError(f"layers: keys and values must be [1, Hkv, n, D] of one shape, got "
                                   f"{tuple(k.shape)}, {tuple(v.shape)}")
    w = DeviceWindow(sink, window)
    off_k, off_v = w.append(k.detach(), v.detach())
    S, D = k.shape[0] * k.shape[1], k.shape[3]
    dtype = storage_dtype or k.dtype
    return w, off_k.reshape(S, -1, D).to(dtype), off_v.reshape(S, -1, D).to(dtype), ExactIndex(), 0


def save_context_kv(directory, layers, token_ids, identity: dict, *, sink: int = 128, window: int = 512,
                    page_tokens: int = 16, storage_dtype=None) -> int:
    """Save a prefilled context to ``directory`` (created; a context already there is replaced).

    ``layers``: one entry per attention layer, a ``(k, v)`` pair ``[1, Hkv, n, D]`` (after RoPE, KV heads not
    repeated) or a :class:`RetrievalKVCache` holding the ``n`` tokens (its window split and its index are saved
    as they are).  Pairs are split like a retrieval cache with ``sink``/``window`` would split them, with an exact
    index (a restore may name another index to build).  ``token_ids``: the ``n`` token ids.  ``identity``: a
    JSON-serialisable dict naming the model (architecture, heads, dtype, RoPE, ...); a restore must present an
    equal one.  ``storage_dtype``: dtype of the offloaded KV of pairs (default: theirs; a lower one is lossy).
    Returns the bytes written."""
    ids, identity = token_list(token_ids), _canonical(identity)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise InvalidArgumentError(f"layers must be a non-empty list (one entry per layer), "
                                   f"got {type(layers).__name__}")
    directory = check_writable_dir(directory, "directory")
    context_path = os.path.join(directory, CONTEXT_FILE)
    if os.path.exists(context_path):
        os.remove(context_path)                 # context.json is the commit point: written last, removed first
    for i, layer in enumerate(layers):
        w, off_k, off_v, index, n_indexed = _layer_state(layer, sink, window, storage_dtype)
        if w.k.shape[0] != 1:
            raise InvalidArgumentError(f"layers: a saved context is one sequence (batch 1), got batch {w.k.shape[0]}")
        if w.seen != len(ids):
            raise InvalidArgumentError(f"layers: layer {i} holds {w.seen} tokens, token_ids has {len(ids)}")
        S, D = off_k.shape[0], off_k.shape[2]
        for what, t in (("keys", off_k), ("values", off_v)):
            f = PagedVectorFile(os.path.join(directory, f"layer{i}.{what}.kv"), S, D, t.dtype, page_tokens, 0)
            f.append(t)
            f.close()
        write_layer_state(directory, i, w, index, n_offloaded=off_k.shape[1], n_indexed=n_indexed,
                          keys_on_ssd=True, page_tokens=page_tokens)
    write_checked_json(context_path, {"format": FORMAT, "version": VERSION, "identity": identity, "layers": len(layers),
                                      "tokens": len(ids), "tokens_sha256": tokens_sha256(ids), "token_ids": ids,
                                      "saved_at": time.time()})
    return directory_bytes(directory)


def directory_bytes(directory) -> int:
    return sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())


# ---------------------------------------------------------------------------------------------------- checking
def read_context_info(directory) -> dict:
    """The checked ``context.json`` of a saved context (:class:`KVFileError` if missing or damaged)."""
    path = os.path.join(os.fspath(directory), CONTEXT_FILE)
    info = read_checked_json(path, "saved context")
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise KVFileError(f"{path!r} is not a saved context of this version ({info.get('format')} "
                          f"{info.get('version')}, expected {FORMAT} {VERSION})")
    if tokens_sha256(info["token_ids"]) != info["tokens_sha256"]:
        raise KVFileError(f"{path!r}: its token ids do not match their recorded sha256")
    return info


def identity_mismatches(saved: dict, current: dict) -> list:
    """``"field: saved X, current Y"`` for every field where two identities differ."""
    saved, current = _canonical(saved), _canonical(current)
    return [f"{key}: saved {saved.get(key)!r}, current {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def check_context(info: dict, identity: dict, token_ids, tokens=None, directory="") -> int:
    """Refuse (:class:`SavedContextMismatchError`) a saved context of another model or other tokens; returns how
    many tokens to restore: ``tokens`` (default: all saved), which ``token_ids`` must start with."""
    where = f"saved context {os.fspath(directory)!r}"
    wrong = identity_mismatches(info["identity"], identity)
    if wrong:
        raise SavedContextMismatchError(f"{where} belongs to another model: " + "; ".join(wrong))
    ids, saved = token_list(token_ids), info["token_ids"]
    tokens = len(saved) if tokens is None else tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= len(saved):
        raise InvalidArgumentError(f"tokens must be an int in [1, {len(saved)}] (the saved tokens), got {tokens!r}")
    if tokens > len(ids):
        raise InvalidArgumentError(f"token_ids has {len(ids)} tokens, fewer than the {tokens} to restore")
    if ids[:tokens] != saved[:tokens]:
        first = next(i for i, (a, b) in enumerate(zip(ids, saved)) if a != b)
        raise SavedContextMismatchError(f"{where} holds other tokens: token_ids differ from the saved tokens at "
                                        f"position {first} ({ids[first]} vs {saved[first]})")
    return tokens


# ---------------------------------------------------------------------------------------------------- restoring
def read_context_kv(directory, layer: int):
    """The full KV of ``layer``: ``(k, v) [1, Hkv, n, D]`` in the window's dtype, every page's checksum verified,
    and the bytes read."""
    meta = read_layer_meta(directory, layer)
    wk, wv = read_window(directory, layer, meta)
    n_sink = min(meta["sink"], meta["seen"])
    n_off = meta["n_offloaded"]
    expect = list(range(n_sink)) + list(range(n_sink + n_off, meta["seen"]))
    if meta["positions"] != expect:
        raise KVFileError(f"saved layer {layer} in {os.fspath(directory)!r}: window positions do not fit "
                          f"{n_sink} sinks + {n_off} offloaded tokens of {meta['seen']}")
    out, nbytes = [], 2 * wk.numel() * wk.element_size()
    B, Hkv, _, D = wk.shape
    for what, w in (("keys", wk), ("values", wv)):
        f = PagedVectorFile.open(os.path.join(os.fspath(directory), f"layer{layer}.{what}.kv"), 0, read_only=True)
        if f.count != n_off:
            raise KVFileError(f"{f.path!r} holds {f.count} tokens, metadata says {n_off}")
        full = torch.empty(B, Hkv, meta["seen"], D, dtype=w.dtype)         # filled in place: one copy of the KV
        full[:, :, :n_sink], full[:, :, n_sink + n_off:] = w[:, :, :n_sink], w[:, :, n_sink:]
        middle = full.view(B * Hkv, meta["seen"], D)[:, n_sink:n_sink + n_off]
        if f.dtype == w.dtype:
            f.read_all(out=middle)
        else:
            middle.copy_(f.read_all())
        nbytes += f.bytes_read
        f.close()
        out.append(full)
    return out[0], out[1], nbytes


def open_context_cache(directory, layer: int, *, scratch_dir, tokens=None, index=None, cache_pages: int = 4096,
                       device=None) -> RetrievalKVCache:
    """A :class:`RetrievalKVCache` of ``layer`` of a saved context: keys in RAM (read once, for the index), the
    window on ``device``, the values left in the saved files, read page by page as retrieval needs them.  The
    saved files are never written; the request's own later tokens go to ``scratch_dir``.  ``index``: None, the
    saved one; a name or object, built anew.  ``tokens`` below the saved count: a prefix only (its KV read in
    full and appended to a new cache, so the index is built anew: ``index`` None means "auto")."""
    meta = read_layer_meta(directory, layer)
    if tokens is None or tokens == meta["seen"]:
        return RetrievalKVCache.open(directory, layer, index, cache_pages, scratch_dir=scratch_dir, device=device)
    k, v, _ = read_context_kv(directory, layer)
    cache = RetrievalKVCache(meta["sink"], meta["window"], index or "auto", ssd_dir=scratch_dir,
                             keys_on_ssd=True, layer=layer, cache_pages=cache_pages)
    cache.append(k[:, :, :tokens].to(device or "cpu"), v[:, :, :tokens].to(device or "cpu"))
    return cache
