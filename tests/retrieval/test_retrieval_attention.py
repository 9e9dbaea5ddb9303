"""retrieval_attention against the dense oracle: retrieving everything must equal dense decode attention."""
from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from sparse_attn.retrieval import RetrievalKVCache, retrieval_attention
from helpers import assert_close, assert_lse_close

from retrieval_helpers import decode_inputs, filled_cache

HEADS = {"mha": (3, 3), "gqa": (4, 2), "mqa": (4, 1)}


def _index(name):
    if name == "exact":
        return "exact"
    from sparse_attn.retrieval import FastScanIndex, IVFIndex, QueryAwareIndex
    if name.startswith("fast"):                                     # every key's code scanned, all re-ranked
        return FastScanIndex(nlist=4, train_min=16, tail_max=8, probe_keys=1.0, shortlist=1000,
                             codes=name.split("_")[1])
    cls = IVFIndex if name == "ivf" else QueryAwareIndex
    return cls(nlist=4, nprobe=4, train_min=16, tail_max=8)        # trained, but every list probed: exact


@pytest.mark.parametrize("L", [1, 63, 65, 113])
@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("Lq", [1, 3])
def test_everything_retrieved_equals_dense(L, heads, Lq):
    Hq, Hkv = HEADS[heads]
    Lq = min(Lq, L)
    q, k, v = decode_inputs(B=2, Hq=Hq, Hkv=Hkv, L=L, D=64, Lq=Lq, seed=L)
    cache = filled_cache(k, v, sink=4, window=16, index="exact")
    out, lse = retrieval_attention(q, cache, top_k=max(1, L), return_lse=True)
    ref, ref_lse = sa.reference_attention(q, k, v, return_lse=True)
    assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert_lse_close(lse, ref_lse, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("index", ["exact", "ivf", "query_aware", "fast_pq4", "fast_sq8"])
@pytest.mark.parametrize("sink,window", [(0, 0), (4, 16), (0, 7), (9, 0)])
def test_every_index_covering_the_context_is_exact(index, sink, window):
    q, k, v = decode_inputs(B=2, Hq=4, Hkv=2, L=200, D=80, Lq=2, seed=7)
    cache = filled_cache(k, v, chunks=(0.3, 0.31, 0.9), sink=sink, window=window, index=_index(index))
    cache.observe_queries(torch.randn(2, 4, 50, 80))
    out = retrieval_attention(q, cache, top_k=500)
    assert_close(out, sa.reference_attention(q, k, v), atol=2e-6, rtol=1e-5)


def test_decode_loop_one_token_at_a_time_matches_dense():
    """Prefill, then decode steps that each append one token: the window slides, tokens move to the index."""
    q_all, k, v = decode_inputs(B=2, Hq=4, Hkv=2, L=90, D=64, Lq=90, seed=3)
    cache = RetrievalKVCache(sink=3, window=10, index=_index("query_aware"))
    cache.append(k[:, :, :40], v[:, :, :40])
    for t in range(40, 90):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        q = q_all[:, :, t:t + 1]
        out = retrieval_attention(q, cache, top_k=100)
        assert_close(out, sa.reference_attention(q, k[:, :, :t + 1], v[:, :, :t + 1]), atol=2e-6, rtol=1e-5)
    assert cache.n_offloaded == 90 - 13


def test_top_k_subset_equals_dense_on_window_plus_exact_top_k():
    """With a small top_k and the exact index, the result is dense attention restricted (by mask) to the window
    and the exact top-k offloaded keys of each query row, per query head (GQA heads pick different keys)."""
    q, k, v = decode_inputs(B=2, Hq=4, Hkv=2, L=113, D=64, Lq=1, seed=11)
    sink, window, top_k = 4, 16, 5
    cache = filled_cache(k, v, sink=sink, window=window, index="exact")
    out = retrieval_attention(q, cache, top_k=top_k)
    kk = k.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2))[..., 0, :]                            # [B, Hq, L]
    off = scores.clone()
    off[..., :sink] = float("-inf")
    off[..., -window:] = float("-inf")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[..., :sink] = True
    mask[..., -window:] = True
    mask.scatter_(-1, off.topk(top_k, -1).indices, True)
    ref = sa.reference_attention(q, k, v, mask=mask[:, :, None, :])
    assert_close(out, ref, atol=2e-6, rtol=1e-5)
    picked = off.topk(top_k, -1).indices
    assert not torch.equal(picked[:, 0], picked[:, 1])                      # heads of a group differ


def test_thread_counts_are_left_alone():
    """The step runs with the caller's torch thread count (an earlier version switched to 1 thread inside every
    call and restored it after): an index records the count it sees during the search."""
    from sparse_attn.retrieval import ExactIndex

    class Recording(ExactIndex):
        seen = []

        def search(self, q, top_k):
            self.seen.append(torch.get_num_threads())
            return super().search(q, top_k)

    q, k, v = decode_inputs(B=1, Hq=4, Hkv=2, L=100, D=64, seed=6)
    cache = filled_cache(k, v, sink=2, window=8, index=Recording())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        retrieval_attention(q, cache, top_k=10)
        assert Recording.seen == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
def test_low_precision_storage_computes_in_fp32(storage):
    """Offloaded KV stored in bf16/fp16 (the window keeps the KV's dtype): the result equals fp32 attention over
    KV whose offloaded part is rounded to the storage dtype, i.e. the arithmetic is fp32."""
    q, k, v = decode_inputs(B=2, Hq=4, Hkv=2, L=150, D=64, seed=8)
    cache = filled_cache(k, v, sink=2, window=8, index="exact", storage_dtype=storage)
    out = retrieval_attention(q, cache, top_k=200)
    kr, vr = k.clone(), v.clone()
    kr[:, :, 2:-8] = kr[:, :, 2:-8].to(storage).float()
    vr[:, :, 2:-8] = vr[:, :, 2:-8].to(storage).float()
    assert_close(out, sa.reference_attention(q, kr, vr), atol=2e-6, rtol=1e-5)
    assert (out - sa.reference_attention(q, k, v)).abs().max() > 1e-5          # the rounding is visible
    assert cache.ram_keys.data.dtype == storage and cache.ram_values.data.dtype == storage


def test_return_indices_names_the_exact_top_k_positions():
    """With the exact index, the indices are the top-k offloaded positions by q . k, per query head, and the
    stats count every offloaded key as scanned and read."""
    q, k, v = decode_inputs(B=2, Hq=4, Hkv=2, L=113, D=64, Lq=1, seed=11)
    sink, window, top_k = 4, 16, 5
    cache = filled_cache(k, v, sink=sink, window=window, index="exact")
    out, idx, stats = retrieval_attention(q, cache, top_k=top_k, return_indices=True, return_stats=True)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2))            # [B, Hq, 1, L]
    scores[..., :sink] = float("-inf")
    scores[..., -window:] = float("-inf")
    want = scores.topk(top_k, -1).indices
    assert idx.shape == (2, 4, 1, top_k)
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
    assert (stats["scanned"] == 113 - sink - window).all() and (stats["read"] == stats["scanned"]).all()
    # the indices are what was attended: dense attention masked to window + those keys gives the output
    mask = torch.zeros(2, 4, 1, 113, dtype=torch.bool)
    mask[..., :sink] = True
    mask[..., -window:] = True
    mask.scatter_(-1, idx, True)
    assert_close(out, sa.reference_attention(q, k, v, mask=mask), atol=2e-6, rtol=1e-5)


def test_indices_are_padded_when_fewer_keys_than_top_k():
    q, k, v = decode_inputs(B=1, Hq=2, Hkv=1, L=30, D=64, seed=2)
    cache = filled_cache(k, v, sink=2, window=8, index="exact")
    _, idx = retrieval_attention(q, cache, top_k=50, return_indices=True)
    assert idx.shape == (1, 2, 1, 50)
    assert sorted(idx[0, 0, 0, :20].tolist()) == list(range(2, 22)) and (idx[..., 20:] == -1).all()
