"""Retrieval decode: KV tiers (device window, CPU RAM, SSD), per-KV-head MIPS indexes, top-k attention merged by
LSE; saved contexts for reuse across requests.  faiss is imported only when an IVF index is built."""
from .attention import retrieval_attention
from .cache import RetrievalKVCache, make_index
from .context_catalogue import CatalogueMatch, ContextCatalogue
from .index_exact import ExactIndex, exact_topk
from .page_file import KVFileError, PagedVectorFile
from .saved_context import (check_context, identity_key, open_context_cache, read_context_info, read_context_kv,
                            save_context_kv)


def __getattr__(name):  # the faiss-backed indexes load lazily
    if name == "IVFIndex":
        from .index_ivf import IVFIndex
        return IVFIndex
    if name == "FastScanIndex":
        from .index_fast import FastScanIndex
        return FastScanIndex
    if name == "QueryAwareIndex":
        from .index_query_aware import QueryAwareIndex
        return QueryAwareIndex
    raise AttributeError(name)


__all__ = ["CatalogueMatch", "ContextCatalogue", "ExactIndex", "FastScanIndex", "IVFIndex", "KVFileError",
           "PagedVectorFile", "QueryAwareIndex", "RetrievalKVCache", "check_context", "exact_topk", "identity_key",
           "make_index", "open_context_cache", "read_context_info", "read_context_kv", "retrieval_attention",
           "save_context_kv"]
