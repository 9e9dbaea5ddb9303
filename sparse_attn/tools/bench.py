"""`python -m sparse_attn bench`: estimate + attention vs dense SDPA (and, on the first pattern's layout, the torch
backend and compiled FlexAttention) on the synthetic workload; one table, ratios measured side by side in one run."""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from ..dense_guard import sparse_is_slower
from ..layout import SparseLayout
from .metrics import attention_recall, relative_error
from ..patterns import AShape, BlockSparse, Dense, VerticalSlash
from ..patterns import Grid, QBoundary, TwoDBoundary, with_modality
from ..backends import BACKEND_NAMES, select_backend
from ..prefill import DEFAULT_PATTERN, dense_attention, estimate, sparse_attention
from .timing import time_call, time_in_turns
from .synthetic import HardWorkload, MixedWorkload, Workload, make_hard_qkv, make_mixed_qkv, make_qkv

PATTERNS = {
    "ashape": lambda: AShape(sink=128, local=1024),
    "vs": lambda: VerticalSlash(vertical=512, slash=1024),
    "block": lambda: BlockSparse(top_k=16),
    "default": lambda: DEFAULT_PATTERN,
    "old-default": lambda: VerticalSlash(gamma=0.95),            # the default before the per-head Auto pattern
    # modality-aware: they get the spans of `--workload mixed` (on the text workload: text only / one video)
    "grid": lambda: Grid(vertical=128, slash=1024, gamma=0.95, min_vertical=64, min_slash=128),
    "qboundary": lambda: QBoundary(gamma=0.95, min_vertical=64, min_slash=128),
    "2dboundary": lambda: TwoDBoundary(gamma=0.95, min_vertical=64, min_slash=128),
}


def _inputs(workload: str, L: int, heads: int, kv_heads: int, head_dim: int):
    """q, k, v and the modality spans (None for the text workload) of one benchmark length."""
    if workload == "mixed":
        return make_mixed_qkv(MixedWorkload(q_heads=heads, kv_heads=kv_heads, seq_len=L, head_dim=head_dim))
    if workload in ("hard", "diffuse"):
        kinds = {"hard": HardWorkload.kinds, "diffuse": ("diffuse",)}[workload]
        return (*make_hard_qkv(HardWorkload(q_heads=heads, kv_heads=kv_heads, seq_len=L, head_dim=head_dim,
                                            kinds=kinds)), None)
    return (*make_qkv(Workload(q_heads=heads, kv_heads=kv_heads, seq_len=L, head_dim=head_dim)), None)


def _flex_time(q, k, v, layout: SparseLayout, repeat: int):
    """Compiled FlexAttention on the layout's aligned cover: (seconds, compile seconds, its density)."""
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = layout.to_flex_block_mask(cover=True)
    flex = torch.compile(flex_attention, dynamic=False)
    start = time.perf_counter()
    flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    compile_s = time.perf_counter() - start
    seconds, _ = time_call(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1]),
                           repeat, warmup=0)     # the compile call above was the warm-up
    cover = SparseLayout.from_block_mask(layout.to_block_mask(causal=True), layout.q_len, layout.k_len,
                                         layout.block_m, layout.block_n)
    return seconds, compile_s, cover.density()


def peak_memory_mb(fn):
    """Peak resident memory added while ``fn`` runs, in MiB (Linux: resets VmHWM first); None elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - before) / 1024
    except OSError:
        return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def run(lengths, patterns, heads=8, kv_heads=2, head_dim=128, repeat=3, flex=True, quality=True, memory=False,
        out=print, workload="text", backend="auto", bf16=False, torch_row=True):
    probe = torch.empty(1, 1, 1, head_dim)
    chosen_backend = select_backend(backend, probe, probe, probe)
    chosen = chosen_backend.name
    out(f"# sparse_attn bench: B=1 Hq={heads} Hkv={kv_heads} D={head_dim} fp32, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, backend {chosen}")
    header = (f"{'pattern':<10} {'L':>6} {'density':>8} {'est ms':>8} {'est %':>6} {'attn ms':>9} {'dense ms':>9} "
              f"{'speedup':>8} {'attn/ideal':>10} {'recall':>7} {'rel err':>8}")
    out(header)
    rows = []
    for L in lengths:
        q, k, v, spans = _inputs(workload, L, heads, kv_heads, head_dim)
        for name in patterns:
            pattern = PATTERNS[name]() if spans is None else with_modality(PATTERNS[name](), spans)
            state = {}
            fns = {"dense": lambda: dense_attention(q, k, v),
                   "estimate": lambda: state.__setitem__("layout", estimate(q, k, pattern)),
                   # what sparse_prefill runs after the estimate: SDPA where the dense guard predicts it faster
                   "attention": lambda: (dense_attention(q, k, v) if sparse_is_slower(state["layout"], chosen) else
                                         sparse_attention(q, k, v, state["layout"], check_layout=False,
                                                          backend=chosen))}
            torch_peer = torch_row and chosen != "torch" and name == patterns[0]
            if torch_peer:
                fns["torch"] = lambda: sparse_attention(q, k, v, state["layout"], check_layout=False, backend="torch")
            # sparse_prefill's own dense route where the backend beats SDPA per key (`prefill._dense_route`)
            dense_peer = chosen_backend.cost_per_key < 1 and name == patterns[0]
            if dense_peer:
                dense_layout = estimate(q, k, Dense())
                fns["dense_backend"] = lambda: sparse_attention(q, k, v, dense_layout, check_layout=False,
                                                                backend=chosen)
            bf16_peer = bf16 and name == patterns[0]
            if bf16_peer:   # the same layout on bf16 copies of q, k, v (made once, outside the timing)
                low = [t.to(torch.bfloat16) for t in (q, k, v)]
                fns["bf16"] = lambda: sparse_attention(*low, state["layout"], check_layout=False, backend=chosen)
            timings = time_in_turns(fns, repeat)
            best = {name: timings.best(name) for name in fns}
            results = timings.results
            dense_s, est_s, attn_s = best["dense"], best["estimate"], best["attention"]
            ref, o, layout = results["dense"], results["attention"], state["layout"]
            density = layout.density()
            recall = attention_recall(q, k, layout) if quality else float("nan")
            row = dict(pattern=name, L=L, heads=heads, density=density, est_ms=est_s * 1e3, attn_ms=attn_s * 1e3,
                       dense_ms=dense_s * 1e3, speedup=dense_s / (est_s + attn_s),
                       attn_vs_ideal=attn_s / (dense_s * density), recall=recall, rel_err=relative_error(o, ref))
            rows.append(row)
            out(f"{name:<10} {L:>6} {density:>8.3f} {row['est_ms']:>8.1f} {100 * est_s / (est_s + attn_s):>5.1f}% "
                f"{row['attn_ms']:>9.1f} "
                f"{row['dense_ms']:>9.1f} {row['speedup']:>7.2f}x {row['attn_vs_ideal']:>10.2f} {recall:>7.3f} "
                f"{row['rel_err']:>8.4f}" + _row_note(row, sparse_is_slower(layout, chosen)))
            if torch_peer:
                torch_s = best["torch"]
                out(f"{'  torch':<10} {L:>6} {density:>8.3f} {row['est_ms']:>8.1f} {'':>6} {torch_s * 1e3:>9.1f} "
                    f"{dense_s * 1e3:>9.1f} {dense_s / (est_s + torch_s):>7.2f}x {torch_s / (dense_s * density):>10.2f} "
                    f"{'':>7} {'':>8}   (the torch backend on the same layout, timed in the same turns)")
            if dense_peer:
                kernel_s = best["dense_backend"]
                out(f"{'  dense':<10} {L:>6} {1.0:>8.3f} {'':>8} {'':>6} {kernel_s * 1e3:>9.1f} {dense_s * 1e3:>9.1f} "
                    f"{dense_s / kernel_s:>7.2f}x {kernel_s / dense_s:>10.2f} {'':>7} "
                    f"{relative_error(results['dense_backend'], ref):>8.4f}   (dense attention on the {chosen} "
                    f"backend: sparse_prefill's dense route; speedup of the {name} row over it "
                    f"{kernel_s / (est_s + attn_s):.2f}x)")
            if bf16_peer:
                bf16_s = best["bf16"]
                rows.append(dict(pattern=name + " bf16", L=L, heads=heads, density=density, est_ms=row["est_ms"],
                                 attn_ms=bf16_s * 1e3, dense_ms=row["dense_ms"], speedup=dense_s / (est_s + bf16_s),
                                 attn_vs_ideal=bf16_s / (dense_s * density), recall=recall,
                                 rel_err=relative_error(results["bf16"], ref)))
                out(f"{'  bf16':<10} {L:>6} {density:>8.3f} {row['est_ms']:>8.1f} {'':>6} {bf16_s * 1e3:>9.1f} "
                    f"{dense_s * 1e3:>9.1f} {dense_s / (est_s + bf16_s):>7.2f}x {bf16_s / (dense_s * density):>10.2f} "
                    f"{'':>7} {rows[-1]['rel_err']:>8.4f}   (bf16 inputs, same layout, timed in the same turns; "
                    f"rel err vs the fp32 dense output; bf16 on {'its GEMMs' if _native_bf16(head_dim) else 'fp32'})")
            if flex and name == patterns[0]:
                flex_s, compile_s, flex_density = _flex_time(q, k, v, layout, repeat)
                out(f"{'  flex':<10} {L:>6} {flex_density:>8.3f} {'':>8} {'':>6} {flex_s * 1e3:>9.1f} "
                    f"{dense_s * 1e3:>9.1f} "
                    f"{dense_s / flex_s:>7.2f}x {'':>10} {'':>7} {'':>8}   (FlexAttention compiled on the "
                    f"{name} layout's block cover; compile {compile_s:.1f} s)")
    if memory:
        L = max(lengths)
        q, k, v, spans = _inputs(workload, L, heads, kv_heads, head_dim)
        from ..prefill import sparse_prefill
        first = PATTERNS[patterns[0]]() if spans is None else with_modality(PATTERNS[patterns[0]](), spans)
        sparse_mb = peak_memory_mb(lambda: sparse_prefill(q, k, v, first, backend=chosen))
        dense_mb = peak_memory_mb(lambda: dense_attention(q, k, v))
        out(f"peak memory added at L={L}: sparse_prefill ({patterns[0]}) {sparse_mb:.0f} MiB, dense SDPA "
            f"{dense_mb:.0f} MiB; inputs {3 * q.numel() * 4 / 2 ** 20:.0f} MiB; one L x L fp32 score matrix "
            f"{L * L * 4 / 2 ** 20:.0f} MiB")
    out("speedup = dense / (estimate + attention); attn/ideal = attention time / (dense time x density); "
        "recall = attention mass kept (mean over query rows); rel err = ||out - dense|| / ||dense||; dense, estimate "
        "and attention of a row are timed warm, in turns, best of --repeat rounds each")
    return rows


def _row_note(row: dict, guard_ran_dense: bool) -> str:
    """Why a row is not a win: the dense guard ran SDPA, or sparse attention does not pay at this length."""
    if guard_ran_dense:
        return "   (dense guard: SDPA ran)"
    if row["speedup"] < 1:
        return "   (below 1x: sparse does not pay for this pattern at this length)"
    return ""


def _native_bf16(head_dim: int) -> bool:
    from ..backends.cpu import loader
    return loader.available() and loader.native_low_precision(torch.bfloat16, head_dim)


def save_rows(rows, path: str) -> None:
    """Append the rows as JSON lines (runs with different lengths or head counts can share one file)."""
    import json
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def plot_rows(path: str, image: str) -> None:
    """Log-log plot of time per query head vs length from a `save_rows` file: dense SDPA, and per pattern the
    sparse total (estimate + attention) and the attention alone (dashed); the ideal (dense x density) dotted."""
    import json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(path) if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 5))
    dense_by_length = {}                                 # each pattern's row timed dense: the best of them
    for r in rows:
        dense_by_length[r["L"]] = min(dense_by_length.get(r["L"], float("inf")), r["dense_ms"] / r["heads"])
    dense = sorted(dense_by_length.items())
    ax.plot([L for L, _ in dense], [t for _, t in dense], "k-o", label="dense SDPA")
    for i, name in enumerate(dict.fromkeys(r["pattern"] for r in rows)):
        sel = sorted((r for r in rows if r["pattern"] == name), key=lambda r: r["L"])
        Ls = [r["L"] for r in sel]
        color = f"C{i}"
        ax.plot(Ls, [(r["est_ms"] + r["attn_ms"]) / r["heads"] for r in sel], "-o", color=color,
                label=f"{name}: estimate + attention")
        ax.plot(Ls, [r["attn_ms"] / r["heads"] for r in sel], "--", color=color, label=f"{name}: attention")
        if " " not in name:
            ax.plot(Ls, [r["dense_ms"] * r["density"] / r["heads"] for r in sel], ":", color=color,
                    label=f"{name}: ideal (dense x density)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (keys = queries)")
    ax.set_ylabel("ms per query head")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("sparse_attn prefill on the CPU (python -m sparse_attn bench)")
    fig.tight_layout()
    fig.savefig(image, dpi=120)


def main(argv=None):
    if "--decode" in (sys.argv[1:] if argv is None else argv):
        from .decode_bench import main as decode_main   # retrieval decode bench: its own options
        return decode_main(argv)
    parser = argparse.ArgumentParser(prog="python -m sparse_attn bench", description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--patterns", nargs="+", default=["vs", "default", "ashape", "block"],
                        choices=sorted(PATTERNS))
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed rounds after one warm-up round; each column is the best of them")
    parser.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                        help="engine of the attention column (auto: the compiled CPU kernel where it builds)")
    parser.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention peer row")
    parser.add_argument("--no-torch-peer", action="store_true", help="skip the torch-backend peer row")
    parser.add_argument("--no-quality", action="store_true", help="skip the attention-mass recall")
    parser.add_argument("--memory", action="store_true", help="peak memory of sparse_prefill vs dense at max L")
    parser.add_argument("--workload", choices=["text", "mixed", "hard", "diffuse"], default="text",
                        help="mixed: text, video frames with grid attention, text (modality patterns get its spans); "
                             "hard: `synthetic.HardWorkload`; diffuse: every head content-random")
    parser.add_argument("--bf16", action="store_true",
                        help="also time the first pattern's layout on bf16 inputs (error vs the fp32 dense output)")
    parser.add_argument("--save", metavar="JSONL", help="append the rows to this file (JSON lines)")
    parser.add_argument("--audit", action="store_true", help="per head: kept mass, density, row-wise optimum, the "
                        "default pattern's choice (no timing)")
    parser.add_argument("--plot", metavar="PNG", help="with --audit: the per-head layouts; else a log-log plot of "
                        "time vs length from the --save file")
    args = parser.parse_args(argv)
    if args.audit:
        from .audit import run_audit
        return run_audit(args.lengths, args.patterns, args.heads, args.kv_heads, args.head_dim, args.workload,
                         args.plot, inputs=_inputs)
    rows = run(args.lengths, args.patterns, args.heads, args.kv_heads, args.head_dim, args.repeat, not args.no_flex,
               not args.no_quality, args.memory, workload=args.workload, backend=args.backend, bf16=args.bf16,
               torch_row=not args.no_torch_peer)
    if args.save:
        save_rows(rows, args.save)
    if args.plot:
        if not args.save:
            parser.error("--plot draws from the --save file (or use it with --audit)")
        plot_rows(args.save, args.plot)
