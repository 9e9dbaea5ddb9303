"""SSD tier: page file round trips, reopen in a new process, and damaged files raise KVFileError."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sparse_attn as sa
from sparse_attn.retrieval import KVFileError, PagedVectorFile, RetrievalKVCache, retrieval_attention
from helpers import assert_close

from retrieval_helpers import decode_inputs, filled_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_page_file_append_gather_reopen(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(3, 75, 16, generator=gen).to(dtype)
    f = PagedVectorFile(tmp_path / "x.kv", streams=3, dim=16, dtype=dtype, page_tokens=8, cache_pages=4)
    for a, b in ((0, 5), (5, 8), (8, 40), (40, 41), (41, 75)):                # partial, exact, multi-page runs
        f.append(data[:, a:b])
    idx = torch.randint(0, 75, (3, 50), generator=gen)
    expect = data[torch.arange(3)[:, None], idx]
    assert torch.equal(f.gather(idx), expect)
    assert len(f.cache) <= 4                                                 # the LRU stays bounded
    f.close()
    g = PagedVectorFile.open(tmp_path / "x.kv")
    assert g.count == 75 and torch.equal(g.gather(idx), expect) and torch.equal(g.read_all(), data)
    more = torch.randn(3, 10, 16, generator=gen).to(dtype)                  # appends continue the partial page
    g.append(more)
    g.close()
    h = PagedVectorFile.open(tmp_path / "x.kv")
    assert torch.equal(h.read_all(), torch.cat([data, more], 1))
    h.close()


def _closed_cache(tmp_path, index="exact"):
    q, k, v = decode_inputs(B=2, Hq=4, Hkv=2, L=113, D=64, seed=2)
    cache = filled_cache(k, v, sink=4, window=16, index=index, ssd_dir=tmp_path, keys_on_ssd=True, page_tokens=8)
    out = retrieval_attention(q, cache, top_k=200)
    assert_close(out, sa.reference_attention(q, k, v), atol=2e-6, rtol=1e-5)
    report = cache.memory_report()
    assert report["ssd_disk"] > 2 * 2 * 93 * 64 * 4 and report["ram_values"] == 0
    cache.close()
    return q, out


_REOPEN = """
import sys, torch
from sparse_attn.retrieval import RetrievalKVCache, retrieval_attention
cache = RetrievalKVCache.open(sys.argv[1], index=None if sys.argv[3] == "saved" else sys.argv[3])
q = torch.load(sys.argv[2])
out, idx = retrieval_attention(q, cache, top_k=int(sys.argv[4]), return_indices=True)
torch.save({"out": out, "indices": idx, "kind": type(cache.index).__name__,
            "params": getattr(cache.index, "params", {})}, sys.argv[2] + ".out")
"""


def _reopen_in_new_process(tmp_path, q, index="exact", top_k=200):
    torch.save(q, tmp_path / "q.pt")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", _REOPEN, str(tmp_path), str(tmp_path / "q.pt"), index, str(top_k)],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    return torch.load(tmp_path / "q.pt.out")


def test_reopen_in_new_process_gives_same_result(tmp_path):
    q, out = _closed_cache(tmp_path)
    again = _reopen_in_new_process(tmp_path, q, index="saved")
    assert torch.equal(again["out"], out) and again["kind"] == "ExactIndex"


def _fast_index():
    from sparse_attn.retrieval import FastScanIndex
    return FastScanIndex(nlist=8, train_min=64, tail_max=16, probe_keys=0.3, shortlist=32)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_reopen_restores_the_fast_index_and_identical_results(tmp_path, storage):
    """After a restart, open() with no index argument brings back the saved kind, parameters and state (lists
    trained on the first keys, later keys added in batches, a tail): the same keys are retrieved, bit for bit."""
    q, k, v = decode_inputs(B=2, Hq=4, Hkv=2, L=700, D=64, seed=12)
    cache = RetrievalKVCache(sink=4, window=16, index=_fast_index(), storage_dtype=storage, ssd_dir=tmp_path,
                             keys_on_ssd=True, page_tokens=8)
    cache.append(k[:, :, :200], v[:, :, :200])
    cache.observe_queries(torch.randn(2, 4, 40, 64))
    for a, b in ((200, 450), (450, 690), (690, 700)):
        retrieval_attention(q, cache, top_k=10)                  # the index grows between steps
        cache.append(k[:, :, a:b], v[:, :, a:b])
    out, idx = retrieval_attention(q, cache, top_k=10, return_indices=True)
    assert cache.index.trained and 0 < cache.index.n_seen - cache.index.n_indexed < 16     # lists and a tail
    cache.close()
    again = _reopen_in_new_process(tmp_path, q, index="saved", top_k=10)
    assert again["kind"] == "FastScanIndex" and again["params"] == _fast_index().params
    assert torch.equal(again["indices"], idx) and torch.equal(again["out"], out)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_index_file_raises(tmp_path, damage):
    q, k, v = decode_inputs(B=1, Hq=2, Hkv=1, L=300, D=32, seed=13)
    cache = filled_cache(k, v, sink=2, window=8, index=_fast_index(), ssd_dir=tmp_path, keys_on_ssd=True)
    retrieval_attention(q, cache, top_k=5)
    cache.close()
    path = tmp_path / "layer0.index"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x04
    else:
        raw = raw[:-10]
    path.write_bytes(bytes(raw))
    with pytest.raises(KVFileError, match="layer0.index"):
        RetrievalKVCache.open(tmp_path)


def test_reopen_in_new_process_with_query_aware_index(tmp_path):
    """The prefill-query sample is stored too, so the attention-aware index is rebuilt; top_k covers all keys."""
    from sparse_attn.retrieval import QueryAwareIndex
    q, k, v = decode_inputs(B=1, Hq=4, Hkv=2, L=300, D=64, seed=4)
    cache = RetrievalKVCache(sink=4, window=16, index=QueryAwareIndex(nlist=4, train_min=32), ssd_dir=tmp_path,
                             keys_on_ssd=True)
    cache.append(k, v)
    cache.observe_queries(torch.randn(1, 4, 40, 64))
    out = retrieval_attention(q, cache, top_k=10)
    cache.close()
    again = RetrievalKVCache.open(tmp_path, index=QueryAwareIndex(nlist=4, train_min=32))
    assert again.index.queries.shape == (2, 80, 64)
    assert_close(retrieval_attention(q, again, top_k=10), out, atol=1e-6, rtol=1e-5)


def test_truncated_file_raises(tmp_path):
    q, _ = _closed_cache(tmp_path)
    path = tmp_path / "layer0.values.kv"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(KVFileError, match="truncated"):
        RetrievalKVCache.open(tmp_path)


def test_flipped_byte_raises_and_never_returns_attention(tmp_path):
    q, _ = _closed_cache(tmp_path)
    path = tmp_path / "layer0.values.kv"
    with open(path, "r+b") as f:
        f.seek(4096 + 3 * 8 * 64 * 4 + 17)                                # inside page slot 3
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    cache = RetrievalKVCache.open(tmp_path)
    with pytest.raises(KVFileError, match="checksum mismatch"):
        retrieval_attention(q, cache, top_k=200)


@pytest.mark.parametrize("victim,offset,match", [("layer0.values.kv", 12, "header"),
                                                  ("layer0.values.kv.table", 30, "page table"),
                                                  ("layer0.meta.json", 20, "metadata")])
def test_damaged_header_table_or_metadata_raises(tmp_path, victim, offset, match):
    _closed_cache(tmp_path)
    path = tmp_path / victim
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(KVFileError, match=match):
        RetrievalKVCache.open(tmp_path)


def test_missing_files_raise(tmp_path):
    with pytest.raises(KVFileError, match="metadata"):
        RetrievalKVCache.open(tmp_path)
    with pytest.raises(KVFileError, match="cannot open"):
        PagedVectorFile.open(tmp_path / "nope.kv")


def test_values_read_through_page_cache(tmp_path):
    q, k, v = decode_inputs(B=1, Hq=2, Hkv=1, L=500, D=32, seed=9)
    cache = filled_cache(k, v, sink=2, window=8, index="exact", ssd_dir=tmp_path, page_tokens=4, cache_pages=48)
    for _ in range(2):
        assert_close(retrieval_attention(q, cache, top_k=20), _dense_on_top(q, k, v, 2, 8, 20), atol=2e-6)
    assert len(cache.ssd_values.cache) <= 48 and cache.ssd_values.cache.hits > 0


def _dense_on_top(q, k, v, sink, window, top_k):
    scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2))[..., 0, :]
    off = scores.clone()
    off[..., :sink] = off[..., -window:] = float("-inf")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[..., :sink] = mask[..., -window:] = True
    mask.scatter_(-1, off.topk(top_k, -1).indices, True)
    return sa.reference_attention(q, k, v, mask=mask[:, :, None, :])
