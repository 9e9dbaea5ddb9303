"""Retrieval decode: KV tiers (device window, CPU RAM, SSD), per-KV-head MIPS indexes, top-k attention merged by
LSE.  faiss is imported only when an IVF index is built."""
from .attention import retrieval_attention
from .cache import RetrievalKVCache, make_index
from .index_exact import ExactIndex, exact_topk
from .page_file import KVFileError, PagedVectorFile


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


__all__ = ["ExactIndex", "FastScanIndex", "IVFIndex", "KVFileError", "PagedVectorFile", "QueryAwareIndex", "RetrievalKVCache",
           "exact_topk", "make_index", "retrieval_attention"]
