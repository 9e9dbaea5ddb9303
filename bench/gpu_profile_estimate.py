"""Where the default pattern's estimate spends its time on a GPU: ``PYTHONPATH=. python bench/gpu_profile_estimate.py``.

Llama-3-8B prefill shapes (B=1, 32 query / 8 KV heads, D=128, bf16, synthetic workload) at the given lengths: the
estimate's wall time (CUDA-synchronised, median of 5), its host synchronisations (sync debug mode "warn"), the heads'
choices, and the torch profiler's top operators by GPU time and by CPU time.  Prints only; no files."""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import sparse_attn as sa
from sparse_attn.patterns import auto
from sparse_attn.tools.synthetic import Workload, make_qkv


def wall_ms(fn, repeat=5) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def host_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    for L in args.lengths:
        q, k, _ = make_qkv(Workload(batch=1, q_heads=32, kv_heads=8, seq_len=L, head_dim=128, dtype=torch.bfloat16),
                           "cuda")
        estimate = lambda: sa.estimate(q, k)                                         # noqa: E731
        estimate()
        _, choice = auto.build_with_choice(sa.DEFAULT_PATTERN, torch.arange(32, device="cuda"), q, k, causal=True,
                                           scale=128 ** -0.5, block_m=64, block_n=64)
        names = [auto.CHOICE_NAMES[c] for c in choice[0].tolist()]
        summary = {n: names.count(n) for n in sorted(set(names))}
        vs_ms = wall_ms(lambda: sa.estimate(q, k, sa.DEFAULT_PATTERN.vertical_slash(L)))
        print(f"\n## L={L}: estimate {wall_ms(estimate):.2f} ms (first vertical-slash rung alone {vs_ms:.2f} ms), "
              f"{host_syncs(estimate)} host syncs, density {estimate().density():.4f}, choices {summary}", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            estimate()
            torch.cuda.synchronize()
        table = prof.key_averages()
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        del q, k
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
