"""Auto's early dense routing (`patterns.auto._row_need`) on the CPU: the compiled count (``csrc/row_need_cpu.cpp``)
against its torch reference path, in turns in one process (warm), on the synthetic text workload (B=1, 8 query /
2 KV heads, D=128, fp32).  Prints best / first quartile / median per path and length, and the largest difference
of the shares they return.

    flock /tmp/sparse_attn_bench.lock python bench/row_need_cpu.py --lengths 32768 65536 --reps 30
"""
from __future__ import annotations

import argparse
import time

import torch

from sparse_attn.estimators import cpu_row_need
from sparse_attn.patterns import auto
from sparse_attn.prefill import DEFAULT_PATTERN
from sparse_attn.tools.bench import _inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    compiled_takes = cpu_row_need.takes
    print(f"# _row_need, ms; {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for L in args.lengths:
        q, k, _, _ = _inputs("text", L, 8, 2, 128)
        heads, scale = torch.arange(8), 128 ** -0.5

        def run(path):
            cpu_row_need.takes = compiled_takes if path == "compiled" else (lambda q, k: False)
            try:
                return auto._row_need(q, k, heads, DEFAULT_PATTERN, scale, True)
            finally:
                cpu_row_need.takes = compiled_takes

        paths = ("torch", "compiled")
        diff = (run("torch") - run("compiled")).abs().max().item()
        times = {p: [] for p in paths}
        for _ in range(args.reps):                      # in turns, so both see the same drift
            for p in paths:
                start = time.perf_counter()
                run(p)
                times[p].append(time.perf_counter() - start)
        for p in paths:
            t = sorted(times[p])
            print(f"L={L:6d} {p:8s} best {t[0] * 1e3:.3f}  q25 {t[len(t) // 4] * 1e3:.3f}  "
                  f"median {t[len(t) // 2] * 1e3:.3f}")
        median = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
        ratio = median["torch"] / median["compiled"]
        print(f"L={L:6d} median torch / compiled {ratio:.2f}x; max |share difference| {diff:.2e}")


if __name__ == "__main__":
    main()
