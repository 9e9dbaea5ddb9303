"""`python -m sparse_attn bench --decode`: retrieval decode vs exact attention over the same CPU-resident KV.

For each context length: build the synthetic decode workload, fill one layer's RetrievalKVCache (all but the
sinks + window offloaded to CPU RAM, or values to SSD with --ssd-dir), let the index see the prefill queries,
build it (timed), then time one decode step (q [1, Hq, 1, D]) of retrieval attention and of exact attention
(torch matmul + softmax + matmul over all keys, fp32, on the CPU) side by side in the same run."""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time

import torch

from .attention import retrieval_attention
from .cache import RetrievalKVCache, make_index
from .workload import DecodeWorkload, make_decode_workload


@contextlib.contextmanager
def intra_op_threads(n):
    """Run the block with ``n`` torch (and, if loaded, faiss) OpenMP threads, restoring them after.

    The benchmark (a caller) chooses thread counts; the library never does.  On a loaded 2-core machine each
    parallel region's barrier can cost milliseconds, so a decode step of small ops is timed with 1 thread."""
    faiss = sys.modules.get("faiss")
    before_torch = torch.get_num_threads()
    before_faiss = faiss.omp_get_max_threads() if faiss is not None else None
    torch.set_num_threads(n)
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before_torch)
        if faiss is not None:
            faiss.omp_set_num_threads(before_faiss)


def exact_decode(q, k, v, scale):
    """Exact attention: ``q [B, Hq, Lq, D]`` over all of ``k, v [B, Hkv, N, D]`` (GQA without repeating KV)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    rows = q.reshape(B * Hkv, -1, D).float()
    logits = torch.bmm(rows, k.reshape(B * Hkv, -1, D).float().transpose(1, 2)) * scale
    probs = torch.softmax(logits, -1)
    return torch.bmm(probs, v.reshape(B * Hkv, -1, D).float()).reshape(B, Hq, Lq, D), logits


def _median_time(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _quality(cache, q, logits, v, ref, out, top_k):
    """Recall of the exact top-k keys (over all keys; window keys count as found), attention mass on the keys
    attended (window + retrieved), and the output error of an oracle that retrieves the exact top-k."""
    B, Hq, Lq, D = q.shape
    S, m, N = logits.shape
    n_sink = cache.window.n_sink
    cache.sync_index()
    ids, _ = cache.index.search(q.reshape(S, m, D).float(), top_k)
    attended = torch.zeros(S, m, N, dtype=torch.bool)
    attended[:, :, cache.window.pos] = True
    valid = ids >= 0
    attended.scatter_(-1, (ids.clamp(min=0) + n_sink).masked_fill(~valid, 0), valid | attended[..., :1])
    probs = torch.softmax(logits, -1)
    exact_top = logits.topk(top_k, -1).indices
    recall = attended.gather(-1, exact_top).float().mean().item()
    off_all = logits.clone()
    off_all[:, :, cache.window.pos] = float("-inf")
    off_top = off_all.topk(top_k, -1).indices - n_sink                       # exact top-k among offloaded keys
    index_recall = (ids[..., :, None] == off_top[..., None, :]).any(-2).float().mean().item()
    mass = (probs * attended).sum(-1).mean().item()
    # oracle: window + exact top-k of the offloaded keys
    off = logits.clone()
    off[:, :, cache.window.pos] = float("-inf")
    oracle = torch.zeros_like(attended)
    oracle[:, :, cache.window.pos] = True
    oracle.scatter_(-1, off.topk(top_k, -1).indices, True)
    p_or = torch.softmax(logits.masked_fill(~oracle, float("-inf")), -1)
    out_or = torch.bmm(p_or, v.reshape(S, N, D).float()).reshape(ref.shape)
    err = lambda o: ((o.float() - ref).norm() / ref.norm()).item()
    return recall, index_recall, mass, err(out), err(out_or)


#: Peak resident bytes of one KV head's row, per byte of its fp32 K + V (measured: 5.1 GB at 1M keys, D=128).
_PEAK_PER_KV_BYTE = 5.5


def _kv_heads_that_fit(keys: int, kv_heads: int, head_dim: int) -> int:
    """The most KV heads (at least 1, at most ``kv_heads``) whose benchmark row fits in 80% of MemAvailable."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return kv_heads                                  # unknown: run as asked
    per_head = _PEAK_PER_KV_BYTE * 2 * keys * head_dim * 4
    return max(1, min(kv_heads, int(0.8 * available // per_head)))


def run(keys_list, heads, kv_heads, indexes, top_k=100, sink=128, window=512, repeat=5, exact_repeat=3,
        head_dim=128, ssd_dir=None, nprobe=None, out=print):
    threads = torch.get_num_threads()
    out(f"# sparse_attn bench --decode: B=1 Hq={heads} Hkv={kv_heads} D={head_dim} fp32 KV in CPU RAM, top_k={top_k},"
        f" sink={sink}, window={window}; {platform.processor() or 'cpu'}, {threads} threads, torch {torch.__version__}")
    out(f"{'keys':>8} {'index':<12} {'build s':>8} {'step ms':>8} {'exact ms':>9} {'speedup':>8} {'recall':>7} "
        f"{'idx rec':>7} {'mass':>7} {'rel err':>8} {'oracle':>8} {'scanned':>8} {'eff GB/s':>9} {'exact GB/s':>10} "
        f"{'win MB':>7} {'ram MB':>8} {'index MB':>8} {'ssd MB':>8}")
    rows = []
    for N in keys_list:
        fit = _kv_heads_that_fit(N, kv_heads, head_dim)
        if fit < kv_heads:
            out(f"# {N} keys x {kv_heads} KV heads would not fit in the available RAM (measured peak ~5x the K+V "
                f"bytes per KV head: workload, RAM tier, index lists, scores); running {fit} KV heads "
                f"({fit * (heads // kv_heads)} query heads) at this length")
        w = DecodeWorkload(keys=N, kv_heads=fit, q_heads=fit * (heads // kv_heads), head_dim=head_dim)
        k, v, q_prefill, q = make_decode_workload(w)
        scale = head_dim ** -0.5
        exact_by_threads = {}
        for n in sorted({1, threads}):      # exact gets its best thread count (on a loaded machine 1 can win)
            with intra_op_threads(n):
                exact_by_threads[n], (ref, logits) = _median_time(lambda: exact_decode(q, k, v, scale),
                                                                  exact_repeat)
        exact_threads = min(exact_by_threads, key=exact_by_threads.get)
        exact_s = exact_by_threads[exact_threads]
        out("# exact attention median ms by threads: " +
            ", ".join(f"{n}: {t * 1e3:.1f}" for n, t in exact_by_threads.items()) + f" (baseline: {exact_threads})")
        kv_bytes = 2 * k.numel() * k.element_size()
        for name in indexes:
            use_ssd = name.endswith("+ssd")
            index = make_index(name[:-4] if use_ssd else name)
            if nprobe is not None and hasattr(index, "nprobe_arg"):
                index.nprobe_arg = nprobe
            tmp = tempfile.TemporaryDirectory(dir=ssd_dir) if use_ssd else None
            cache = RetrievalKVCache(sink, window, index, ssd_dir=tmp.name if tmp else None)
            cache.append(k, v)
            cache.observe_queries(q_prefill)
            start = time.perf_counter()
            cache.sync_index()
            build_s = time.perf_counter() - start
            step_s, (o, stats) = _median_time(lambda: retrieval_attention(q, cache, top_k, return_stats=True), repeat)
            recall, index_recall, mass, err, oracle = _quality(cache, q, logits, v, ref, o, top_k)
            scanned = stats["scanned"].float().mean().item() / max(1, cache.n_offloaded)
            mem = cache.memory_report()
            row = dict(keys=N, index=name, build_s=build_s, step_ms=step_s * 1e3, exact_ms=exact_s * 1e3,
                       speedup=exact_s / step_s, recall=recall, index_recall=index_recall, mass=mass, rel_err=err, oracle_err=oracle,
                       scanned=scanned, eff_gbps=kv_bytes / step_s / 1e9, exact_gbps=kv_bytes / exact_s / 1e9,
                       **mem)
            rows.append(row)
            mb = lambda b: b / 2 ** 20
            out(f"{N:>8} {name:<12} {build_s:>8.1f} {row['step_ms']:>8.1f} {row['exact_ms']:>9.1f} "
                f"{row['speedup']:>7.1f}x {recall:>7.3f} {index_recall:>7.3f} {mass:>7.4f} {err:>8.4f} {oracle:>8.4f} {scanned:>7.2%} "
                f"{row['eff_gbps']:>9.1f} {row['exact_gbps']:>10.2f} {mb(mem['device_window']):>7.1f} "
                f"{mb(mem['ram_keys'] + mem['ram_values']):>8.0f} {mb(mem['index_ram']):>8.0f} "
                f"{mb(mem['ssd_disk']):>8.0f}")
            del cache
            if tmp:
                tmp.cleanup()
    out("step ms = median retrieval_attention time for one decode step (all heads, 1 intra-op thread); exact = torch matmul+softmax+"
        "matmul over every key (median); recall = fraction of the exact top-k keys (over all keys) that were "
        "attended (window or retrieved); idx rec = recall of the exact top-k among the offloaded keys (the index's "
        "own task); mass = exact attention mass on attended keys; oracle = rel err of window + "
        "exact top-k; scanned = keys scored by the index per query row / offloaded keys; eff GB/s = K+V bytes of "
        "the context / step time; exact GB/s = K+V bytes / exact time; MB per tier: device window, CPU RAM (K+V "
        "capacity), index RAM, SSD file")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sparse_attn bench --decode", description=__doc__)
    parser.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decode-keys", type=int, nargs="+", default=[131072, 1048576],
                        help="context lengths (keys per KV head)")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--indexes", nargs="+", default=["ivf", "query_aware"],
                        choices=["exact", "ivf", "query_aware", "exact+ssd", "ivf+ssd", "query_aware+ssd"])
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--nprobe", type=int, default=None, help="lists probed (default 5%% of the lists)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ssd-dir", default=None, help="where '+ssd' rows put their value files (a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss
            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    run(args.decode_keys, args.heads, args.kv_heads, args.indexes, args.top_k, args.sink, args.window, args.repeat,
        head_dim=args.head_dim, ssd_dir=args.ssd_dir, nprobe=args.nprobe, out=emit)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
