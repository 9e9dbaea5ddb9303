"""One layer's retrieval KV cache: device window + CPU RAM tier + optional SSD tier + a per-KV-head index.

Token flow: ``append(k, v)`` puts new tokens in the device window; tokens pushed out of it go to the RAM tier
(keys, and values unless an SSD directory is given, in which case values - and with ``keys_on_ssd`` keys too - go
to a checksummed page file).  The index receives offloaded keys incrementally, lazily at the next search, so the
prefill queries seen in between can shape it.  Streams: batch x KV head, ``S = B * Hkv``."""
from __future__ import annotations

import os
import weakref

import torch

from .checked_json import read_checked_json, write_checked_json
from .index_exact import ExactIndex
from .index_file import load_index, save_index
from .overlay_file import OverlayVectorFile
from .page_file import KVFileError, PagedVectorFile, check_writable_dir
from .ram_tier import RamTier
from .window import DeviceWindow
from ..errors import InvalidArgumentError, InvalidTypeError

META_VERSION = 2                 # 2: the index is saved (layer<L>.index) and restored


#: Index names :func:`make_index` accepts ("auto" is the fast index, which searches exactly until it is trained).
INDEX_NAMES = ("auto", "fast", "exact", "ivf", "query_aware")
INDEX_METHODS = ("attach", "observe_queries", "add", "search")     # what a cache calls on its index


def make_index(index="auto"):
    """``index``: an index object, or a name (defaults of each): "auto"/"fast" (default): exact search while fewer
    than 32768 keys are offloaded, then :class:`~.index_fast.FastScanIndex` (query-aware IVF lists of 4-bit
    fast-scan PQ codes, probe budget in keys, exact re-ranking of a shortlist); "exact": every key scored; "ivf": plain faiss IVF-Flat; "query_aware": IVF-Flat
    with query-aware lists."""
    if not isinstance(index, str):
        missing = [m for m in INDEX_METHODS if not callable(getattr(index, m, None))]
        if missing:
            raise InvalidTypeError(f"index must be a name ({', '.join(map(repr, INDEX_NAMES))}) or an index object "
                                   f"with {', '.join(INDEX_METHODS)}; {type(index).__name__} lacks {', '.join(missing)}")
        return index
    if index in ("auto", "fast"):
        from .index_fast import FastScanIndex
        return FastScanIndex()
    if index == "exact":
        return ExactIndex()
    if index == "ivf":
        from .index_ivf import IVFIndex
        return IVFIndex()
    if index == "query_aware":
        from .index_query_aware import QueryAwareIndex
        return QueryAwareIndex()
    raise InvalidArgumentError(f"index must be one of {', '.join(map(repr, INDEX_NAMES))} or an index object, got {index!r}")


# Index objects that serve a cache: an index holds one cache's keys, so a second cache must not share it.  Kept
# here (weakly) rather than as an attribute stamped on the caller's object.
_OWNED_INDEXES = weakref.WeakSet()


def _claim(index) -> None:
    try:
        if index in _OWNED_INDEXES:
            raise InvalidArgumentError("index: this index object already serves another cache (layer); pass a new index "
                             "object or a name per cache")
        _OWNED_INDEXES.add(index)
    except TypeError:                 # not weakly referenceable or not hashable: cannot be tracked, trust the caller
        pass


class RetrievalKVCache:
    """KV cache of one attention layer for retrieval decode (see the module docstring).

    ``sink``/``window``: tokens kept exact on the device; ``index``: see :func:`make_index`;
    ``storage_dtype``: dtype of offloaded KV in RAM and on SSD (default: the KV's dtype; bf16/fp16 halve the
    memory of fp32, and every score and sum is still computed in fp32); ``ssd_dir``: directory for the SSD tier (values, and keys with ``keys_on_ssd``); ``layer``: names
    the files; ``page_tokens``/``cache_pages``: SSD page size in tokens and the RAM page cache bound."""

    def __init__(self, sink: int = 128, window: int = 512, index="auto", *, storage_dtype=None, ssd_dir=None,
                 keys_on_ssd: bool = False, layer: int = 0, page_tokens: int = 16, cache_pages: int = 4096):
        self.window = DeviceWindow(sink, window)
        self.index = make_index(index)
        _claim(self.index)
        self.storage_dtype, self.layer = storage_dtype, layer
        self.ssd_dir = None if ssd_dir is None else check_writable_dir(ssd_dir, "ssd_dir")
        self.keys_on_ssd, self.page_tokens, self.cache_pages = keys_on_ssd, page_tokens, cache_pages
        if keys_on_ssd and ssd_dir is None:
            raise InvalidArgumentError("keys_on_ssd=True needs ssd_dir")
        self.batch = self.kv_heads = self.dim = None
        self.ram_keys = self.ram_values = self.ssd_keys = self.ssd_values = None
        self.n_indexed = 0

    # ------------------------------------------------------------------------------------------ shape
    @property
    def n_offloaded(self) -> int:
        return 0 if self.ram_keys is None else self.ram_keys.count

    @property
    def seq_len(self) -> int:
        return self.window.seen

    def _path(self, what: str) -> str:
        return _layer_file(self.ssd_dir, self.layer, f"{what}.kv")

    def _init_tiers(self, k: torch.Tensor) -> None:
        B, Hkv, _, D = k.shape
        self.batch, self.kv_heads, self.dim = B, Hkv, D
        dtype = self.storage_dtype or k.dtype
        self.storage_dtype = dtype
        S = B * Hkv
        self.ram_keys = RamTier(S, D, dtype)
        if self.ssd_dir is None:
            self.ram_values = RamTier(S, D, dtype)
        else:
            self.ssd_values = PagedVectorFile(self._path("values"), S, D, dtype, self.page_tokens, self.cache_pages)
            if self.keys_on_ssd:
                self.ssd_keys = PagedVectorFile(self._path("keys"), S, D, dtype, self.page_tokens, 0)
        self.index.attach(self.ram_keys)

    # ------------------------------------------------------------------------------------------ updates
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k, v [B, Hkv, n, D]``: new tokens (after RoPE), in position order."""
        if k.dim() != 4 or k.shape != v.shape:
            raise InvalidArgumentError(f"k and v must be [B, Hkv, n, D] of one shape, got {tuple(k.shape)}, {tuple(v.shape)}")
        if self.dim is None:
            self._init_tiers(k)
        elif (k.shape[0], k.shape[1], k.shape[3]) != (self.batch, self.kv_heads, self.dim):
            raise InvalidArgumentError(f"k must be [{self.batch}, {self.kv_heads}, n, {self.dim}] like earlier appends, "
                             f"got {tuple(k.shape)}")
        k_out, v_out = self.window.append(k, v)
        if k_out.shape[2]:
            S = self.batch * self.kv_heads
            k_flat = k_out.reshape(S, -1, self.dim).cpu()
            v_flat = v_out.reshape(S, -1, self.dim).cpu()
            self.ram_keys.append(k_flat)
            if self.ram_values is not None:
                self.ram_values.append(v_flat)
            else:
                self.ssd_values.append(v_flat)
                if self.ssd_keys is not None:
                    self.ssd_keys.append(k_flat)

    def observe_queries(self, q: torch.Tensor) -> None:
        """``q [B, Hq, Lq, D]`` (prefill queries): shown to the index, grouped by KV head (attention-aware)."""
        if self.dim is None:
            return
        B, Hq, Lq, D = q.shape
        self.index.observe_queries(q.reshape(B * self.kv_heads, (Hq // self.kv_heads) * Lq, D))

    def sync_index(self) -> None:
        """Give the index the keys offloaded since the last call (incremental)."""
        n = self.n_offloaded
        if n > self.n_indexed:
            self.index.add(self.ram_keys.view()[:, self.n_indexed:n])
            self.n_indexed = n

    def gather(self, ids: torch.Tensor):
        """``ids [S, m]`` offloaded positions -> ``(keys, values) [S, m, D]`` from RAM or SSD."""
        keys = self.ram_keys.gather(ids)
        values = self.ram_values.gather(ids) if self.ram_values is not None else self.ssd_values.gather(ids)
        return keys, values

    # ------------------------------------------------------------------------------------------ accounting
    def memory_report(self) -> dict:
        """Bytes per tier: device window, RAM keys/values, index (RAM), SSD (disk) and its RAM page cache."""
        ssd = [f for f in (self.ssd_values, self.ssd_keys) if f is not None]
        return {
            "device_window": self.window.nbytes(),
            "ram_keys": 0 if self.ram_keys is None else self.ram_keys.nbytes(),
            "ram_values": 0 if self.ram_values is None else self.ram_values.nbytes(),
            "index_ram": self.index.nbytes(),
            "ssd_disk": sum(f.nbytes_disk() for f in ssd),
            "ssd_ram_cache": sum(f.nbytes_ram() for f in ssd),
        }

    # ------------------------------------------------------------------------------------------ persistence
    def close(self) -> None:
        """Flush the SSD tier and write the window and metadata next to it, so :meth:`open` can restore it."""
        if self.ssd_dir is None or self.dim is None:
            return
        write_layer_state(self.ssd_dir, self.layer, self.window, self.index, n_offloaded=self.n_offloaded,
                          n_indexed=self.n_indexed, keys_on_ssd=self.keys_on_ssd, page_tokens=self.page_tokens)
        for f in (self.ssd_values, self.ssd_keys):
            if f is not None:
                f.close()

    @classmethod
    def open(cls, ssd_dir, layer: int = 0, index=None, cache_pages: int = 4096, *, scratch_dir=None,
             device=None) -> "RetrievalKVCache":
        """Restore a cache closed by :meth:`close` (possibly in another process); keys must have been on SSD.

        ``index=None`` (default): the saved index, of the saved kind and state, so searches return what they
        returned before :meth:`close`.  An index name or object: that index, rebuilt from the stored keys (and
        the saved prefill-query sample).  ``scratch_dir``: None, the cache goes on in ``ssd_dir`` (later tokens
        extend its files); a directory, the files in ``ssd_dir`` are only read (a saved context stays as saved)
        and later tokens go to files in ``scratch_dir`` (a later :meth:`close` there is not reopenable).
        ``device``: where the window goes (default CPU).  Missing, truncated or corrupted files raise
        :class:`KVFileError`."""
        saved_dir = os.fspath(ssd_dir)
        meta = read_layer_meta(saved_dir, layer)
        meta_path = _layer_file(saved_dir, layer, "meta.json")
        if not meta["keys_on_ssd"]:
            raise KVFileError(f"{meta_path!r}: keys were kept in RAM only (keys_on_ssd=False); cannot reopen")
        if scratch_dir is not None and os.path.realpath(scratch_dir) == os.path.realpath(saved_dir):
            raise InvalidArgumentError("scratch_dir must differ from ssd_dir (the saved files are read-only there)")
        saved = load_index(_layer_file(saved_dir, layer, "index"))
        if saved.name != meta["index"]:
            raise KVFileError(f"{meta_path!r} names a {meta['index']!r} index, the index file holds {saved.name!r}")
        if index is None:
            index, n_indexed = saved, meta["n_indexed"]
        else:
            index, n_indexed = make_index(index), 0
            if getattr(saved, "queries", None) is not None:
                index.observe_queries(saved.queries)
        self = cls(meta["sink"], meta["window"], index, ssd_dir=scratch_dir or saved_dir, layer=layer,
                   cache_pages=cache_pages)
        B, Hkv, D = meta["batch"], meta["kv_heads"], meta["dim"]
        self.batch, self.kv_heads, self.dim, self.keys_on_ssd = B, Hkv, D, True
        read_only = scratch_dir is not None
        self.ssd_values = PagedVectorFile.open(_layer_file(saved_dir, layer, "values.kv"), cache_pages, read_only)
        self.ssd_keys = PagedVectorFile.open(_layer_file(saved_dir, layer, "keys.kv"), 0, read_only)
        self.storage_dtype = self.ssd_values.dtype
        for f in (self.ssd_values, self.ssd_keys):
            if f.count != meta["n_offloaded"] or (f.streams, f.dim) != (B * Hkv, D):
                raise KVFileError(f"{f.path!r} holds {f.count} tokens of {f.streams} streams, metadata says "
                                  f"{meta['n_offloaded']} of {B * Hkv}")
        self.window.k, self.window.v = read_window(saved_dir, layer, meta, device)
        self.window.pos = torch.tensor(meta["positions"], dtype=torch.int64)
        self.window.seen = meta["seen"]
        self.ram_keys = RamTier(B * Hkv, D, self.storage_dtype, capacity=meta["n_offloaded"])
        self.ram_keys.append(self.ssd_keys.read_all())
        if read_only:         # the request's own tokens go to new files in scratch_dir
            self.ssd_values, self.ssd_keys = (
                OverlayVectorFile(f, PagedVectorFile(self._path(what), f.streams, D, f.dtype, f.P, pages))
                for f, what, pages in ((self.ssd_values, "values", cache_pages), (self.ssd_keys, "keys", 0)))
        self.index.attach(self.ram_keys)
        self.n_indexed = n_indexed
        return self


def _layer_file(ssd_dir, layer: int, what: str) -> str:
    return os.path.join(os.fspath(ssd_dir), f"layer{layer}.{what}")


def write_layer_state(ssd_dir, layer: int, window: DeviceWindow, index, *, n_offloaded: int, n_indexed: int,
                      keys_on_ssd: bool, page_tokens: int) -> None:
    """What :meth:`RetrievalKVCache.open` needs beside the offloaded KV's page files (``layer<L>.values.kv``,
    ``layer<L>.keys.kv``): the window's KV (exact copies, ``layer<L>.window_k.kv`` / ``window_v``), the index
    (``layer<L>.index``) and the checksummed metadata (``layer<L>.meta.json``)."""
    B, Hkv, _, D = window.k.shape
    S = B * Hkv
    for what, t in (("window_k", window.k), ("window_v", window.v)):
        f = PagedVectorFile(_layer_file(ssd_dir, layer, f"{what}.kv"), S, D, t.dtype, page_tokens, 0)
        f.append(t.reshape(S, -1, D).cpu())
        f.close()
    save_index(_layer_file(ssd_dir, layer, "index"), index)
    meta = {"version": META_VERSION, "sink": window.sink, "window": window.window, "seen": window.seen,
            "positions": window.pos.tolist(), "batch": B, "kv_heads": Hkv, "dim": D, "n_offloaded": n_offloaded,
            "n_indexed": n_indexed, "keys_on_ssd": keys_on_ssd, "index": index.name}
    write_checked_json(_layer_file(ssd_dir, layer, "meta.json"), meta)


def read_layer_meta(ssd_dir, layer: int) -> dict:
    """The checked metadata :func:`write_layer_state` wrote for ``layer`` (:class:`KVFileError` if damaged)."""
    path = _layer_file(ssd_dir, layer, "meta.json")
    meta = read_checked_json(path, "cache metadata")
    if meta.get("version") != META_VERSION:
        raise KVFileError(f"cache metadata {path!r} is of another version ({meta.get('version')}, "
                          f"expected {META_VERSION})")
    return meta


def read_window(ssd_dir, layer: int, meta: dict, device=None):
    """The saved window ``(k, v) [B, Hkv, n_static, D]`` of ``layer`` (files only read), on ``device``."""
    out = []
    for what in ("window_k", "window_v"):
        f = PagedVectorFile.open(_layer_file(ssd_dir, layer, f"{what}.kv"), 0, read_only=True)
        if f.count != len(meta["positions"]) or (f.streams, f.dim) != (meta["batch"] * meta["kv_heads"], meta["dim"]):
            raise KVFileError(f"{f.path!r} holds {f.count} tokens of {f.streams} streams, metadata says "
                              f"{len(meta['positions'])} of {meta['batch'] * meta['kv_heads']}")
        t = f.read_all().reshape(meta["batch"], meta["kv_heads"], -1, meta["dim"])
        f.close()
        out.append(t if device is None else t.to(device))
    return tuple(out)
