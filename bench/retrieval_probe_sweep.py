"""Recall of the exact top-100 vs fraction of keys scanned, for the plain and the query-aware IVF, over nprobe and
the query-aware probe's spread weight beta; one KV head, 4 query heads x 8 decode rows.

    PYTHONPATH=. python bench/retrieval_probe_sweep.py 1048576
"""
import sys
import time


from sparse_attn.retrieval import IVFIndex, QueryAwareIndex, exact_topk
from sparse_attn.retrieval.workload import DecodeWorkload, make_decode_workload


def main(n_keys: int):
    k, v, q_prefill, q = make_decode_workload(DecodeWorkload(keys=n_keys, kv_heads=1, q_heads=4, decode_rows=8,
                                                             seed=1))
    keys, rows = k[0], q[0].reshape(1, -1, k.shape[-1])
    _, ref = exact_topk(rows, keys, 100)
    recall = lambda ids: (ids[..., :, None] == ref[..., None, :]).any(-2).float().mean().item()
    for name, index in (("ivf", IVFIndex()), ("query_aware", QueryAwareIndex())):
        index.observe_queries(q_prefill[0].reshape(1, -1, k.shape[-1]))
        start = time.perf_counter()
        index.add(keys)
        build = time.perf_counter() - start
        for beta in ((0.0, 1.0) if name == "query_aware" else (None,)):
            if beta is not None:
                index.beta = beta
            for nprobe in (5, 10, 20, 40, 80):
                index.nprobe = nprobe
                ids, scanned, _ = index.search(rows, 100)
                print(f"N={n_keys} {name} build {build:.0f}s nlist {index.nlist} beta {beta} nprobe {nprobe}: "
                      f"recall@100 {recall(ids):.3f} scanned {scanned.float().mean().item() / n_keys:.4f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 131072)
