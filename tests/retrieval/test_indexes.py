"""Index recall against exact MIPS on the synthetic decode workload (queries and keys differently distributed)."""
from __future__ import annotations

import pytest
import torch

from sparse_attn.retrieval import IVFIndex, QueryAwareIndex, exact_topk
from sparse_attn.retrieval.workload import DecodeWorkload, make_decode_workload

N, TOP = 8192, 50


def _setup():
    k, v, q_prefill, q = make_decode_workload(DecodeWorkload(keys=N, kv_heads=2, q_heads=8, decode_rows=4,
                                                             keys_per_topic=256, prefill_queries=2048))
    keys = k[0]                                                      # [S=2, N, D]
    rows = q[0].reshape(2, -1, q.shape[-1])                          # the 4 query heads of each KV head together
    return keys, rows, q_prefill[0].reshape(2, -1, q.shape[-1])


def _recall(ids, ref):
    hits = (ids[..., :, None] == ref[..., None, :]).any(-2).float()
    return hits.mean().item()


def test_workload_is_deterministic_and_shaped():
    a = make_decode_workload(DecodeWorkload(keys=1000, kv_heads=2, q_heads=4, head_dim=64))
    b = make_decode_workload(DecodeWorkload(keys=1000, kv_heads=2, q_heads=4, head_dim=64))
    assert [t.shape for t in a] == [(1, 2, 1000, 64), (1, 2, 1000, 64), (1, 4, 2048, 64), (1, 4, 1, 64)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0][0, 0], a[0][0, 1])


def test_query_aware_index_recall_and_scan():
    keys, rows, prefill = _setup()
    _, ref = exact_topk(rows, keys, TOP)
    index = QueryAwareIndex(nlist=64, nprobe=4)                      # probes 6% of the lists
    index.observe_queries(prefill)
    index.add(keys)
    ids, scanned, _ = index.search(rows, TOP)
    assert ids.shape == (2, 16, TOP)
    assert _recall(ids, ref) >= 0.9
    assert scanned.float().mean().item() / N <= 0.15
    # the same ids the exact path would rank: every returned id is a real key, in bounds
    assert ((ids >= 0) & (ids < N)).all()


def test_plain_ivf_recall_is_measurable_and_full_probe_is_exact():
    keys, rows, _ = _setup()
    _, ref = exact_topk(rows, keys, TOP)
    index = IVFIndex(nlist=64, nprobe=4)
    index.add(keys)
    ids, _, _ = index.search(rows, TOP)
    assert 0.2 <= _recall(ids, ref) <= 1.0
    index.nprobe = 64
    ids, scanned, _ = index.search(rows, TOP)
    assert _recall(ids, ref) == 1.0 and (scanned == N).all()


def test_incremental_adds_are_searchable_at_once():
    """Keys added after training wait in the exact tail, then move into the lists; both are found."""
    keys, rows, prefill = _setup()
    index = QueryAwareIndex(nlist=32, nprobe=32, train_min=4096, tail_max=1000)
    index.observe_queries(prefill)
    for start in range(0, N, 700):
        index.add(keys[:, start:start + 700])
        seen = min(N, start + 700)
        _, ref = exact_topk(rows, keys[:, :seen], TOP)
        ids, _, _ = index.search(rows, TOP)
        assert _recall(ids, ref) == 1.0, seen
    assert index.trained and index.n_indexed + index.tail.shape[1] == N


def test_fewer_training_keys_than_lists_still_builds():
    keys = torch.randn(1, 20, 16)
    index = IVFIndex(nlist=64, nprobe=64, train_min=10, tail_max=10)
    index.add(keys)
    ids, _, _ = index.search(torch.randn(1, 3, 16), 20)
    assert index.nlist == 20 and sorted(ids[0, 0].tolist()) == list(range(20))


def _fast_setup(B=1, storage=torch.float32):
    """The workload's keys in a RAM tier (as the cache stores them) and its query rows, for the fast index."""
    from sparse_attn.retrieval.ram_tier import RamTier
    k, v, q_prefill, q = make_decode_workload(DecodeWorkload(keys=N, kv_heads=2, q_heads=8, decode_rows=4,
                                                             keys_per_topic=256, prefill_queries=2048))
    keys, rows, prefill = k[0], q[0].reshape(2, -1, q.shape[-1]), q_prefill[0].reshape(2, -1, q.shape[-1])
    if B == 2:                                                       # a second batch row with other content
        keys = torch.cat([keys, keys.flip(1)])
        rows, prefill = torch.cat([rows, rows.flip(1)]), torch.cat([prefill, prefill])
    tier = RamTier(keys.shape[0], keys.shape[-1], storage)
    tier.append(keys)
    return tier, rows, prefill


@pytest.mark.parametrize("codes", ["pq4", "sq8"])
@pytest.mark.parametrize("B", [1, 2])
def test_fast_index_recall_budget_and_reads(codes, B):
    """Every stream (batch x KV head) in one faiss index; codes of ~20% of the keys scanned (the budget counts
    keys), only a shortlist of 150 read in full, recall of the exact top-50 per stream high enough that the code
    scores must be good (pq4 codes of the keys instead of their residuals give 0.91-0.92 here)."""
    from sparse_attn.retrieval import FastScanIndex
    tier, rows, prefill = _fast_setup(B, torch.bfloat16)
    index = FastScanIndex(nlist=64, probe_keys=0.2, shortlist=150, codes=codes, dims_per_code=2, train_min=1024,
                          tail_max=512)                              # 2 dims per pq4 code: residuals matter
    index.attach(tier)
    index.observe_queries(prefill)
    for start in range(0, N, 3000):                                  # trained on the first keys, then batches
        index.add(tier.view()[:, start:start + 3000])
    S = tier.streams
    assert index.trained and len(index.faiss_indexes) == 1 and index.faiss_indexes[0].nlist == S * 64
    ids, scanned, read = index.search(rows, TOP)
    _, ref = exact_topk(rows, tier.view(), TOP)
    for s in range(S):
        assert _recall(ids[s], ref[s]) >= (0.935 if codes == "pq4" else 0.97), s
    tail = N - index.n_indexed
    budget = int(0.2 * index.n_indexed + 0.999)
    biggest = int(index.list_sizes.max())
    assert ((scanned - tail >= budget) & (scanned - tail < budget + biggest)).all()      # keys, not lists
    assert (read <= 150 + tail).all() and (read < scanned).all()
    assert ((ids >= 0) & (ids < N)).all()


def test_fast_index_is_exact_until_trained():
    """The default index ('auto') searches exactly below train_min keys: same ids as exact search, every key read."""
    from sparse_attn.retrieval import FastScanIndex, make_index
    tier, rows, _ = _fast_setup()
    index = make_index("auto")
    assert isinstance(index, FastScanIndex) and index.train_min > N
    index.attach(tier)
    index.add(tier.view())
    ids, scanned, read = index.search(rows, TOP)
    _, ref = exact_topk(rows, tier.view(), TOP)
    assert not index.trained and torch.equal(ids, ref) and (read == N).all() and (scanned == N).all()


@pytest.mark.parametrize("kwargs,match", [({"probe_keys": 0}, "probe_keys"), ({"probe_keys": 1.5}, "probe_keys"),
                                          ({"shortlist": 0}, "shortlist"), ({"codes": "pq8"}, "codes"),
                                          ({"dims_per_code": 3}, "dims_per_code")])
def test_fast_index_bad_arguments(kwargs, match):
    from sparse_attn.retrieval import FastScanIndex
    with pytest.raises(ValueError, match=match):
        FastScanIndex(**kwargs)
