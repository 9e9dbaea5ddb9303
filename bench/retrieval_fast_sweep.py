"""Recall of the exact top-100 for FastScanIndex over codes x probe budget (keys) x shortlist, with the keys scanned
(codes) and read in full (re-ranked) per query row; one KV head, 4 query heads x 8 decode rows, keys in bf16.
No timing (run `python -m sparse_attn bench --decode` for that).

    PYTHONPATH=. python bench/retrieval_fast_sweep.py 1048576 sq8:1 pq4:1 pq4:2
"""
import sys

import torch

from sparse_attn.retrieval import FastScanIndex, exact_topk
from sparse_attn.retrieval.ram_tier import RamTier
from sparse_attn.retrieval.workload import DecodeWorkload, make_decode_workload


def main(n_keys: int, specs):
    k, _, q_prefill, q = make_decode_workload(DecodeWorkload(keys=n_keys, kv_heads=1, q_heads=4, decode_rows=8,
                                                             seed=1))
    tier = RamTier(1, k.shape[-1], torch.bfloat16, capacity=n_keys)
    tier.append(k[0])
    rows, prefill = q[0].reshape(1, -1, k.shape[-1]), q_prefill[0].reshape(1, -1, k.shape[-1])
    _, ref = exact_topk(rows, tier.view(), 100)
    for spec in specs:                                   # "codes:dims_per_code"
        codes, dims = spec.split(":")
        index = FastScanIndex(codes=codes, dims_per_code=int(dims))
        index.attach(tier)
        index.observe_queries(prefill)
        index.add(tier.view())
        for probe in (0.02, 0.03, 0.05):
            for shortlist in (256, 512, 1024, 2048, 4096):
                index.probe_keys, index.shortlist = probe, shortlist
                ids, scanned, read = index.search(rows, 100)
                recall = (ids[..., :, None] == ref[..., None, :]).any(-2).float().mean().item()
                print(f"{codes} dpc {dims} probe {probe} shortlist {shortlist}: recall {recall:.3f} "
                      f"scanned {scanned.float().mean() / n_keys:.4f} read {read.float().mean() / n_keys:.4f}",
                      flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:] or ["sq8:1", "pq4:1"])
