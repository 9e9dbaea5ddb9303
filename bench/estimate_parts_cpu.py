"""Where the CPU estimate's time goes, per part, for the default pattern and VerticalSlash(512, 1024): one process
per (checkout, length), alternated round after round by ``--driver`` so a before/after pair shares the machine's
drift.  Parts are timed by wrapping the functions that exist in the checkout on PYTHONPATH (old and new names).

    flock /tmp/sparse_attn_bench.lock python bench/estimate_parts_cpu.py --driver OLD_CHECKOUT NEW_CHECKOUT \
        --lengths 16384 32768 65536 --rounds 3 --out bench/results/FILE.txt
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

# part label -> (module, attribute); wrapped where the checkout has it
_PARTS = {
    "row_need": ("sparse_attn.patterns.auto", "_row_need"),
    "sample_scores": ("sparse_attn.estimators.cpu_scores", "cpu_sample_scores"),
    "rows_kept_mass": ("sparse_attn.estimators.cpu_scores", "cpu_rows_kept_mass"),
    "computed_share": ("sparse_attn.patterns.auto", "computed_share"),
    "pick": ("sparse_attn.patterns.auto", "_pick"),
    "choose": ("sparse_attn.patterns.vertical_slash", "_choose"),
    "layout_from_ranges": ("sparse_attn.patterns.vertical_slash", "layout_from_ranges"),
    "compiled_layout": ("sparse_attn.patterns.vertical_slash_cpu", "vertical_slash_layout"),
}


def _worker(L: int, reps: int, head_dim: int) -> dict:
    import importlib

    import torch
    import sparse_attn as sa
    from sparse_attn.patterns.vertical_slash import VerticalSlash
    from sparse_attn.prefill import DEFAULT_PATTERN
    from sparse_attn.tools.bench import _inputs

    spent = collections.defaultdict(float)

    def timed(label, f):
        def g(*a, **kw):
            t = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                spent[label] += time.perf_counter() - t
        return g

    for label, (mod, name) in _PARTS.items():
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, name):
            setattr(m, name, timed(label, getattr(m, name)))
    build = VerticalSlash.build.__func__
    VerticalSlash.build = classmethod(lambda c, *a, **kw: timed("vs_build", build)(c, *a, **kw))

    q, k, v, _ = _inputs("text", L, 8, 2, head_dim)
    out = {"L": L, "rows": {}}
    for name, pattern in (("default", DEFAULT_PATTERN), ("vs512_1024", sa.VerticalSlash(512, 1024))):
        layout = sa.estimate(q, k, pattern)                         # warm-up (builds, caches)
        runs = []
        for _ in range(reps):
            spent.clear()
            t = time.perf_counter()
            layout = sa.estimate(q, k, pattern)
            runs.append(dict(spent, total=time.perf_counter() - t))
        best = min(runs, key=lambda r: r["total"])
        attn = min(_timed_call(lambda: sa.sparse_attention(q, k, v, layout)) for _ in range(2))
        out["rows"][name] = {"best": best, "totals": [r["total"] for r in runs], "attention": attn,
                             "density": layout.density(), "threads": torch.get_num_threads()}
    return out


def _timed_call(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _driver(args) -> None:
    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    results = collections.defaultdict(list)       # (checkout, L) -> worker outputs
    for L in args.lengths:
        for r in range(args.rounds):
            for label, path in (("before", args.old), ("after", args.new)):
                env = dict(os.environ, PYTHONPATH=path)
                res = subprocess.run([sys.executable, __file__, "--worker", str(L), "--reps", str(args.reps),
                                      "--head-dim", str(args.head_dim)],
                                     env=env, capture_output=True, text=True, check=True, cwd=path)
                results[label, L].append(json.loads(res.stdout.strip().splitlines()[-1]))
    ms = lambda s: f"{s * 1e3:.2f}"
    say(f"# B=1, 8 query / 2 KV heads, D={args.head_dim}, fp32, synthetic text workload; before = {args.old}, "
        f"after = {args.new}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for pattern in args.patterns:
        say(f"## {pattern}: per part, ms (best estimate call of {args.reps} per process; one column per process, "
            f"before/after processes alternated)")
        for L in args.lengths:
            for label in ("before", "after"):
                rows = [res["rows"][pattern] for res in results[label, L]]
                parts = sorted({p for row in rows for p in row["best"]}, key=lambda p: (p != "total", p))
                for p in parts:
                    say(f"{pattern:10s} L={L:6d} {label:6s} {p:18s} " +
                        " ".join(ms(row["best"].get(p, 0.0)) for row in rows))
                build_rest = [row["best"].get("vs_build", 0) - row["best"].get("sample_scores", 0) for row in rows]
                say(f"{pattern:10s} L={L:6d} {label:6s} {'vs_build - scores':18s} " + " ".join(map(ms, build_rest)))
                say(f"{pattern:10s} L={L:6d} {label:6s} {'attention':18s} " +
                    " ".join(ms(row["attention"]) for row in rows))
                say(f"{pattern:10s} L={L:6d} {label:6s} {'estimate share %':18s} " + " ".join(
                    f"{100 * row['best']['total'] / (row['best']['total'] + row['attention']):.1f}" for row in rows))
            say()
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", type=int)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--driver", nargs=2, metavar=("OLD", "NEW"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--patterns", nargs="+", default=["default", "vs512_1024"])
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.reps, args.head_dim)))
    else:
        args.old, args.new = args.driver
        _driver(args)


if __name__ == "__main__":
    main()
