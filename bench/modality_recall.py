"""Modality-aware patterns vs VerticalSlash on the synthetic mixed text / video / text workload.

For each modality pattern: density, attention recall (mean over query rows of the dense attention mass on the
layout's keys, as `sparse_attn.ops.metrics.attention_recall`), estimate and attention time on the torch backend.
For VerticalSlash: a sweep of budgets, and the lowest density at which it reaches 0.95 and each modality pattern's
recall.  Not collected by pytest.  Run from the repository root:

    PYTHONPATH=. python bench/modality_recall.py --length 32768
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import sparse_attn as sa
from sparse_attn.tools.timing import time_call as timed
from sparse_attn.prefill import dense_attention
from sparse_attn.tools.synthetic import MixedWorkload, make_mixed_qkv


def recalls(q, k, layouts, *, rows_per_chunk=256):
    """`attention_recall` of several layouts (same block_m) in one pass over the dense probabilities.  A layout
    lists the same keys for every row of a query block, so the block's rows are summed first; the mass of a tile is
    then a difference of prefix sums over keys and a column one entry (tiles and columns of a valid layout never
    overlap), so each layout costs O(tiles + columns), not O(k_len), per query block."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g, bm = Hq // Hkv, layouts[0].block_m
    step = max(bm, rows_per_chunk // bm * bm)
    totals = [0.0] * len(layouts)
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, g, r1 - r0, D)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", qc, k.float()).reshape(B, Hq, r1 - r0, Lk) * D ** -0.5
        pos = torch.arange(r0, r1) + (Lk - Lq)
        logits.masked_fill_(torch.arange(Lk) > pos[:, None], float("-inf"))
        probs = torch.softmax(logits, -1)
        n_blk = -(-(r1 - r0) // bm)
        probs = torch.nn.functional.pad(probs, (0, 0, 0, n_blk * bm - (r1 - r0)))
        per_block = probs.reshape(B, Hq, n_blk, bm, Lk).sum(3, dtype=torch.float64)   # [B, Hq, n_blk, Lk]
        del logits, probs
        prefix = torch.nn.functional.pad(per_block.cumsum(-1), (1, 0))
        blocks = slice(r0 // bm, r0 // bm + n_blk)
        for i, layout in enumerate(layouts):
            bn = layout.block_n
            offsets = layout.block_offset[:, :, blocks].long()
            used = torch.arange(offsets.shape[-1]) < layout.block_count[:, :, blocks, None]
            tiles = prefix.gather(-1, (offsets + bn).clamp(max=Lk)) - prefix.gather(-1, offsets.clamp(max=Lk))
            cols = layout.column_index[:, :, blocks].long()
            used_c = torch.arange(cols.shape[-1]) < layout.column_count[:, :, blocks, None]
            columns = per_block.gather(-1, cols.clamp(max=Lk - 1))
            totals[i] += float((tiles * used).sum() + (columns * used_c).sum())
    return [t / (B * Hq * Lq) for t in totals]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--frame-tokens", type=int, default=576)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.95)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    w = MixedWorkload(seq_len=args.length, frame_tokens=args.frame_tokens)
    q, k, v, spans = make_mixed_qkv(w)
    video = spans.spans[0]
    undescribed = sa.ModalitySpans.of([(s.start, s.end, s.kind) for s in spans.spans], args.length)
    print(f"# modality_recall: B={w.batch} Hq={w.q_heads} Hkv={w.kv_heads} D={w.head_dim} L={args.length} fp32; "
          f"text [0, {video.start}), video [{video.start}, {video.end}) = {video.length // video.frame_tokens} frames "
          f"x {video.frame_tokens} tokens, text [{video.end}, {args.length})")
    print(f"# {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    budgets = dict(gamma=0.95, min_vertical=64, min_slash=128)
    modality = {
        "grid": sa.Grid(vertical=128, slash=1024, width=8, **budgets).with_modality(spans),
        "grid(tiles)": sa.Grid(vertical=128, slash=1024, width=8, tail_columns=False, **budgets).with_modality(spans),
        "grid(detect)": sa.Grid(vertical=128, slash=1024, width=8, **budgets).with_modality(undescribed),
        "qboundary": sa.QBoundary(**budgets).with_modality(spans),
        "2dboundary": sa.TwoDBoundary(**budgets).with_modality(spans),
    }
    sweep = {f"vs(gamma={g})": sa.VerticalSlash(gamma=g) for g in (0.9, 0.95, 0.98, 0.99, 0.995)}
    sweep.update({f"vs({vv},{ss})": sa.VerticalSlash(vertical=vv, slash=ss)
                  for vv, ss in ((1000, 6096), (2000, 12288), (4000, 24576))})
    layouts, est = {}, {}
    for name, pattern in {**modality, **sweep}.items():
        est[name], layouts[name] = timed(lambda: sa.estimate(q, k, pattern), args.repeat)
    start = time.perf_counter()
    rec = dict(zip(layouts, recalls(q, k, list(layouts.values()))))
    print(f"# recall of {len(layouts)} layouts in {time.perf_counter() - start:.0f} s")
    dense_s, _ = timed(lambda: dense_attention(q, k, v), args.repeat)

    print(f"{'pattern':<16} {'density':>8} {'recall':>7} {'est ms':>8} {'attn ms':>9} {'dense ms':>9}")
    attn = {}

    def row(name):
        if name not in attn:
            attn[name], _ = timed(lambda: sa.sparse_attention(q, k, v, layouts[name], check_layout=False,
                                                              backend="torch"), args.repeat)
        print(f"{name:<16} {layouts[name].density():>8.4f} {rec[name]:>7.4f} {est[name] * 1e3:>8.0f} "
              f"{attn[name] * 1e3:>9.0f} {dense_s * 1e3:>9.0f}")

    for name in modality:
        row(name)
    print("# VerticalSlash sweep (density, recall):")
    for name in sweep:
        print(f"#   {name:<18} {layouts[name].density():.4f} {rec[name]:.4f}")

    def vs_needs(target):
        ok = [n for n in sweep if rec[n] >= target]
        return min(ok, key=lambda n: layouts[n].density()) if ok else None

    print("# lowest VerticalSlash density reaching each recall (from the sweep):")
    for name in [None, *modality]:
        target = args.target if name is None else rec[name]
        label = f"recall >= {target:.4f}" + ("" if name is None else f" ({name})")
        best = vs_needs(target)
        if best is None:
            print(f"#   {label}: not reached by the sweep (best {max(rec[n] for n in sweep):.4f})")
        else:
            print(f"#   {label}: {best} density {layouts[best].density():.4f}")
            row(best)


if __name__ == "__main__":
    main()
