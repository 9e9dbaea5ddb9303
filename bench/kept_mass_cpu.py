"""The held-out check alone (`cpu_scores.cpu_rows_kept_mass`) on the arguments the default pattern passes it (B=1, 8
query / 2 KV heads, D=128, fp32, synthetic text workload): min and median of N calls with the keys warm in cache,
and with the caches flushed before each call (a 96 MiB buffer written), as after the sample pass in an estimate.
With --accuracy, the masses instead: bf16 and fp32 GEMMs, native and portable code paths, against the readable
torch reference (`row_sample.rows_kept_mass`, fp32).  Times the checkout on PYTHONPATH; alternate two checkouts
round after round to compare them:

    for r in 1 2 3; do for c in OLD NEW; do PYTHONPATH=$c flock /tmp/sparse_attn_bench.lock \\
        python bench/kept_mass_cpu.py --lengths 32768 65536; done; done
"""
from __future__ import annotations

import argparse
import time

import torch


def captured_arguments(L: int):
    """The (args, kwargs) of the first held-out check of one default-pattern estimate at length L."""
    import sparse_attn as sa
    from sparse_attn.estimators import cpu_scores
    from sparse_attn.prefill import DEFAULT_PATTERN
    from sparse_attn.tools.bench import _inputs

    q, k, _, _ = _inputs("text", L, 8, 2, 128)
    calls, check = [], cpu_scores.cpu_rows_kept_mass
    cpu_scores.cpu_rows_kept_mass = lambda *a, **kw: calls.append((a, kw)) or check(*a, **kw)
    try:
        sa.estimate(q, k, DEFAULT_PATTERN)
    finally:
        cpu_scores.cpu_rows_kept_mass = check
    return calls[0]


def timings(fn, calls: int, flush=None) -> tuple[float, float]:
    fn()
    spent = []
    for _ in range(calls):
        if flush is not None:
            flush()
        t = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - t)
    spent.sort()
    return spent[0], spent[len(spent) // 2]


def accuracy(L: int, a, kw) -> None:
    import os

    from sparse_attn.estimators import cpu_scores
    from sparse_attn.estimators.row_sample import rows_kept_mass

    reference = rows_kept_mass(*a, **kw).double()
    got, switch_before = {}, os.environ.get("SPARSE_ATTN_CPU_LOW_PRECISION")
    for gemm, switch in (("bf16", "1"), ("fp32", "0")):
        os.environ["SPARSE_ATTN_CPU_LOW_PRECISION"] = switch
        for native in (True, False):
            got[gemm, native] = cpu_scores.cpu_rows_kept_mass(*a, **kw, native=native).double()
            print(f"L={L} {gemm} GEMMs, native={native}: max |mass - reference| "
                  f"{(got[gemm, native] - reference).abs().max().item():.2e}")
        print(f"L={L} {gemm} GEMMs: max |native - portable| "
              f"{(got[gemm, True] - got[gemm, False]).abs().max().item():.2e}")
    if switch_before is None:
        os.environ.pop("SPARSE_ATTN_CPU_LOW_PRECISION")
    else:
        os.environ["SPARSE_ATTN_CPU_LOW_PRECISION"] = switch_before
    print(f"L={L} reference masses {[round(x, 4) for x in reference.flatten().tolist()]}")


def main():
    from sparse_attn.estimators import cpu_scores

    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--accuracy", action="store_true")
    args = ap.parse_args()
    junk = torch.empty(24 << 20)
    for L in args.lengths:
        a, kw = captured_arguments(L)
        if args.accuracy:
            accuracy(L, a, kw)
            continue
        check = lambda: cpu_scores.cpu_rows_kept_mass(*a, **kw)
        warm, cold = timings(check, args.calls), timings(check, args.calls, flush=lambda: junk.fill_(1.0))
        print(f"L={L} threads={torch.get_num_threads()} rows_kept_mass ms (min / median of {args.calls}): "
              f"warm {warm[0] * 1e3:.2f} / {warm[1] * 1e3:.2f}, cold {cold[0] * 1e3:.2f} / {cold[1] * 1e3:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
