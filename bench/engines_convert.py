"""Time `convert_vertical_slash_indexes` on MInference-sized indexes (1000 verticals, up to 6096 slashes, 64x64
blocks): the engines' rules (default) against this package's clip=True index, in turns (round after round, warm)
in one process, since this VM's speed drifts.  CPU tensors; prints one line per (length, mode) with the median.

    PYTHONPATH=. python bench/engines_convert.py [--heads 8] [--lengths 8192 32768] [--rounds 3]
"""
import argparse
import platform
import statistics
import time

import torch

from sparse_attn.integrations import convert_vertical_slash_indexes


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
        times, sizes = {"engine": [], "clip": []}, {}
        for _ in range(args.rounds + 1):                                  # first round: warm-up, not kept
            for mode in times:
                t0 = time.perf_counter()
                out = convert_vertical_slash_indexes(lens, lens, vert, slash, length, 64, 64, causal=True,
                                                     clip=mode == "clip")
                times[mode].append(time.perf_counter() - t0)
                tiles = int(out[0].sum())
                cols = int(out[2].sum())
                sizes[mode] = (tiles, cols, tuple(out[1].shape))
        for mode in ("engine", "clip"):
            kept = times[mode][1:]
            tiles, cols, shape = sizes[mode]
            print(f"L={length} {mode:6s} median {statistics.median(kept) * 1e3:8.1f} ms  runs "
                  f"{' '.join(f'{t * 1e3:.1f}' for t in kept)}  tiles {tiles} columns {cols} block_offset {shape}")
        ratio = statistics.median(times["engine"][1:]) / statistics.median(times["clip"][1:])
        print(f"L={length} engine / clip time ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
