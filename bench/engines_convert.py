"""Time `convert_vertical_slash_indexes` on MInference-sized indexes (1000 verticals, up to 6096 slashes, 64x64
blocks): the engines' rules (default) against this package's clip=True index, in turns (round after round, warm)
in one process, since this VM's speed drifts.  CPU tensors; prints one line per (length, mode) with the median.

    PYTHONPATH=. python bench/engines_convert.py [--heads 8] [--lengths 8192 32768] [--rounds 3]
"""
import argparse
import platform

import torch

from sparse_attn.integrations import convert_vertical_slash_indexes
from sparse_attn.tools.timing import time_in_turns


def indexes(length: int, heads: int, n_v: int, n_s: int, causal: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n_v, n_s = min(n_v, length), min(n_s, length)
    vert = torch.stack([torch.randperm(length, generator=gen)[:n_v].sort().values for _ in range(heads)])
    slash = torch.stack([torch.randperm(length, generator=gen)[:n_s].sort(descending=True).values
                         for _ in range(heads)])
    if not causal:                     # non-causal: queries after the keys, distances from 1 on
        slash = slash + 1
    return vert[None].int(), slash[None].int()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"# engines convert, CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, heads {args.heads}, 1000 verticals, min(6096, L) slashes, 64x64")
    for length in args.lengths:
        lens = torch.tensor([length], dtype=torch.int32)
        vert, slash = indexes(length, args.heads, 1000, 6096, True)
        fns = {mode: (lambda clip: lambda: convert_vertical_slash_indexes(lens, lens, vert, slash, length, 64, 64,
                                                                       causal=True, clip=clip))(mode == "clip")
               for mode in ("engine", "clip")}
        timings = time_in_turns(fns, args.rounds)                          # one warm-up round, then in turns
        for mode in fns:
            out = timings.results[mode]
            kept = timings.samples[mode]
            print(f"L={length} {mode:6s} median {timings.median(mode) * 1e3:8.1f} ms  runs "
                  f"{' '.join(f'{t * 1e3:.1f}' for t in kept)}  tiles {int(out[0].sum())} columns "
                  f"{int(out[2].sum())} block_offset {tuple(out[1].shape)}")
        ratio = timings.median("engine") / timings.median("clip")
        print(f"L={length} engine / clip time ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
