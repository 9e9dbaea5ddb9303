"""Bad input raises ValueError naming the argument and what was expected."""
from __future__ import annotations

import os

import pytest
import torch

from sparse_attn.retrieval import RetrievalKVCache, retrieval_attention
from sparse_attn.retrieval.page_file import PagedVectorFile

from retrieval_helpers import decode_inputs, filled_cache


@pytest.fixture
def cache_and_q():
    q, k, v = decode_inputs(B=2, Hq=4, Hkv=2, L=65, D=64)
    return filled_cache(k, v, sink=2, window=8, index="exact"), q


@pytest.mark.parametrize("top_k", [0, -3, 2.5, True, None])
def test_top_k_must_be_positive_int(cache_and_q, top_k):
    cache, q = cache_and_q
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        retrieval_attention(q, cache, top_k=top_k)


def test_wrong_head_dim(cache_and_q):
    cache, q = cache_and_q
    with pytest.raises(ValueError, match=r"q head dim \(32\) must equal the cache's head dim \(64\)"):
        retrieval_attention(q[..., :32], cache, top_k=4)


def test_mismatched_gqa(cache_and_q):
    cache, q = cache_and_q
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of the cache's KV heads \(2\)"):
        retrieval_attention(q[:, :3], cache, top_k=4)


def test_batch_and_rows_and_empty_cache(cache_and_q):
    cache, q = cache_and_q
    with pytest.raises(ValueError, match=r"q batch \(1\) must equal"):
        retrieval_attention(q[:1], cache, top_k=4)
    with pytest.raises(ValueError, match=r"q rows \(70\) must be <= tokens in the cache \(65\)"):
        retrieval_attention(q.expand(2, 4, 70, 64), cache, top_k=4)
    with pytest.raises(ValueError, match="cache is empty"):
        retrieval_attention(q, RetrievalKVCache(), top_k=4)
    with pytest.raises(ValueError, match="q must be a floating"):
        retrieval_attention(q[0], cache, top_k=4)


def test_several_reasons_in_one_message(cache_and_q):
    cache, q = cache_and_q
    with pytest.raises(ValueError, match="top_k must.*q head dim"):
        retrieval_attention(q[..., :32], cache, top_k=0)


def test_directory_not_writable(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="ssd_dir must be a writable directory"):
        RetrievalKVCache(ssd_dir=a_file / "sub")
    if os.geteuid() != 0:                    # root writes through permission bits; the file case covers it
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="ssd_dir must be a writable directory"):
            RetrievalKVCache(ssd_dir=ro)


def test_cache_arguments():
    with pytest.raises(ValueError, match="sink and window must be >= 0"):
        RetrievalKVCache(sink=-1)
    with pytest.raises(ValueError, match="index must be"):
        RetrievalKVCache(index="hnsw")
    with pytest.raises(ValueError, match="keys_on_ssd=True needs ssd_dir"):
        RetrievalKVCache(keys_on_ssd=True)
    cache = RetrievalKVCache()
    cache.append(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"k must be \[1, 2, n, 8\]"):
        cache.append(torch.zeros(1, 3, 3, 8), torch.zeros(1, 3, 3, 8))
    with pytest.raises(ValueError, match="k and v must be"):
        cache.append(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 4, 8))


def test_index_and_file_arguments(tmp_path):
    from sparse_attn.retrieval import IVFIndex, QueryAwareIndex
    with pytest.raises(ValueError, match="nlist must be >= 1"):
        IVFIndex(nlist=0)
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        QueryAwareIndex(nprobe=0)
    f = PagedVectorFile(tmp_path / "a.kv", streams=2, dim=4)
    with pytest.raises(ValueError, match=r"x must be \[2, n, 4\]"):
        f.append(torch.zeros(3, 1, 4))


def test_index_object_cannot_serve_two_caches():
    from sparse_attn.retrieval import ExactIndex
    index = ExactIndex()
    RetrievalKVCache(index=index)
    with pytest.raises(ValueError, match="index: this index object already serves another cache"):
        RetrievalKVCache(index=index)
