"""Dense causal attention: the compiled CPU kernel over an all-keys layout vs PyTorch's CPU SDPA (what
`sparse_prefill`'s dense cases chose between), and the kernel's segment size (`loader.SEGMENT_KEYS`) on dense,
vertical-slash and block-sparse layouts.  Variants in turns, warm; ratios per round.

    python bench/cpu_dense_route.py --cases 1024:1024:128:fp32 16384:16384:128:fp32 1:4096:128:fp32 --out FILE
    python bench/cpu_dense_route.py --segments 512 1024 2048 --length 16384

A case is Lq:Lk:head_dim:dtype (8 query / 2 KV heads, B=1, random inputs)."""
from __future__ import annotations

import argparse

import torch

import sparse_attn as sa
from sparse_attn.backends.cpu import loader
from sparse_attn.prefill import _dense
from sparse_attn.tools.cli import line_printer
from sparse_attn.tools.timing import time_in_turns

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inputs(lq, lk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, generator=gen).to(dtype) for h, n in ((8, lq), (2, lk), (2, lk)))
    return q, k, v


def dense_cases(cases, rounds, log):
    log("case                         sdpa ms   kernel ms   sdpa/kernel per round        rel diff")
    for case in cases:
        lq, lk, d, dt = case.split(":")
        lq, lk, d = int(lq), int(lk), int(d)
        q, k, v = inputs(lq, lk, d, DTYPES[dt])
        layout = sa.estimate(q.float(), k.float(), sa.Dense())
        calls = max(1, int(2e6 // (lq * lk)))          # small cases: several calls per timed sample
        fns = {"sdpa": lambda: [_dense(q, k, v, causal=True, scale=d ** -0.5) for _ in range(calls)][-1],
               "kernel": lambda: [sa.sparse_attention(q, k, v, layout, backend="cpu", check_layout=False)
                                  for _ in range(calls)][-1]}
        t = time_in_turns(fns, rounds)
        ratios = [a / b for a, b in zip(t.samples["sdpa"], t.samples["kernel"])]
        ref = t.results["sdpa"].float()
        diff = ((t.results["kernel"].float() - ref).norm() / ref.norm()).item()
        log(f"{case:24s} {t.median('sdpa') / calls * 1e3:10.3f} {t.median('kernel') / calls * 1e3:11.3f}   "
            f"{' '.join(f'{r:5.2f}' for r in ratios):28s} {diff:.1e}")


def segment_sweep(segments, length, rounds, log):
    q, k, v = inputs(length, length, 128, torch.float32)
    layouts = {"dense": sa.estimate(q, k, sa.Dense()), "vs(512,1024)": sa.estimate(q, k, sa.VerticalSlash(512, 1024)),
               "bs(top_k=64)": sa.estimate(q, k, sa.BlockSparse(top_k=64))}

    def with_segment(seg, layout):
        def run():
            loader.SEGMENT_KEYS = seg
            return sa.sparse_attention(q, k, v, layout, backend="cpu", check_layout=False)
        return run
    fns = {"sdpa": lambda: _dense(q, k, v, causal=True, scale=128 ** -0.5)}
    fns.update({f"{name} seg={seg}": with_segment(seg, lay) for seg in segments for name, lay in layouts.items()})
    default = loader.SEGMENT_KEYS
    try:
        t = time_in_turns(fns, rounds)
    finally:
        loader.SEGMENT_KEYS = default
    sdpa = t.median("sdpa")
    log(f"L={length}, fp32, D=128: median of {rounds} rounds; attn/ideal = time / (SDPA time x density)")
    for name in fns:
        density = 1.0 if name == "sdpa" else layouts[name.split()[0]].density()
        log(f"{name:22s} {t.median(name) * 1e3:9.1f} ms  density {density:5.3f}  attn/ideal "
            f"{t.median(name) / (sdpa * density):5.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=[])
    ap.add_argument("--segments", nargs="*", type=int, default=[])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    log = line_printer(args.out)
    log(f"# cpu_dense_route: torch {torch.__version__}, {torch.get_num_threads()} threads, segment "
        f"{loader.SEGMENT_KEYS} keys")
    if args.cases:
        dense_cases(args.cases, args.rounds, log)
    if args.segments:
        segment_sweep(args.segments, args.length, args.rounds, log)


if __name__ == "__main__":
    main()
