"""`python -m sparse_attn bench --decode`: retrieval decode vs exact attention over the same CPU-resident KV.

For each context length: build the synthetic decode workload (queries out of the keys' distribution), fill one
layer's RetrievalKVCache (all but the sinks + window offloaded to CPU RAM in ``--storage-dtype``, or values to SSD
with a '+ssd' index), let the index see the prefill queries, build it (timed), then time decode steps (one query
row per query head, every query head of the layer: q [1, Hq, 1, D]) of retrieval attention and of exact
attention over the same keys (fp32 arithmetic, chunked over keys) in turns, round after round, in one run."""
from __future__ import annotations

import argparse
import ast
import contextlib
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch

from ..retrieval.attention import retrieval_attention
from ..retrieval.cache import INDEX_NAMES, RetrievalKVCache, make_index
from ..retrieval.workload import DecodeWorkload, make_decode_workload
from .timing import time_in_turns
from ..errors import InvalidArgumentError


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


def exact_decode(q, k, v, scale, chunk: int = 1 << 17):
    """Exact attention of ``q [B, Hq, Lq, D]`` over all of ``k, v [B, Hkv, N, D]`` (GQA without repeating KV), fp32
    arithmetic whatever the storage dtype (converted ``chunk`` keys at a time).  Returns the output and the
    logits ``[B * Hkv, g * Lq, N]``."""
    B, Hq, Lq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    rows = q.reshape(B * Hkv, -1, D).float()
    kf, vf = k.reshape(B * Hkv, N, D), v.reshape(B * Hkv, N, D)
    logits = torch.cat([torch.bmm(rows, kf[:, i:i + chunk].float().transpose(1, 2)) for i in range(0, N, chunk)], -1)
    probs = torch.softmax(logits.mul_(scale), -1)
    out = sum(torch.bmm(probs[..., i:i + chunk], vf[:, i:i + chunk].float()) for i in range(0, N, chunk))
    return out.reshape(B, Hq, Lq, D), logits


def _quality(cache, logits, v, ref, out, positions, top_k):
    """Recall of the exact top-k keys (over all keys; window keys count as found), attention mass on the keys
    attended (window + retrieved), the output's relative error, and that of an oracle attending the window + the
    exact top-k offloaded keys.  ``logits [S, m, N]``, ``positions [S, m, top_k]`` (from return_indices)."""
    S, m, N = logits.shape
    D = v.shape[-1]
    window = torch.zeros(N, dtype=torch.bool)
    window[cache.window.pos] = True
    attended = window.expand(S, m, N).clone()
    valid = positions >= 0
    attended.scatter_(-1, positions.clamp(min=0), valid | window[positions.clamp(min=0)])
    recall = attended.gather(-1, logits.topk(top_k, -1).indices).float().mean().item()
    mass = (torch.softmax(logits, -1) * attended).sum(-1).mean().item()
    oracle = window.expand(S, m, N).clone()
    oracle.scatter_(-1, logits.masked_fill(window, float("-inf")).topk(top_k, -1).indices, True)
    p_or = torch.softmax(logits.masked_fill(~oracle, float("-inf")), -1)
    out_or = sum(torch.bmm(p_or[..., i:i + (1 << 17)], v.reshape(S, N, D)[:, i:i + (1 << 17)].float())
                 for i in range(0, N, 1 << 17)).reshape(ref.shape)
    err = lambda o: ((o.float() - ref).norm() / ref.norm()).item()
    return recall, mass, err(out), err(out_or)


def _top_k_guidance(refs, v, sink, window, ks):
    """Per ``k``: mean attention mass on the window + the exact top-k of the other keys, and the output error of
    attending only those (what a perfect index gives at ``top_k = k``)."""
    rows = []
    for kk in ks:
        masses, errs = [], []
        for ref, logits in refs:
            S, m, N = logits.shape
            window_mask = torch.zeros(N, dtype=torch.bool)
            window_mask[:min(sink, N)] = True
            window_mask[max(0, N - window):] = True
            keep = window_mask.expand(S, m, N).clone()
            kk_eff = min(kk, int((~window_mask).sum()))
            if kk_eff:
                keep.scatter_(-1, logits.masked_fill(window_mask, float("-inf")).topk(kk_eff, -1).indices, True)
            masses.append((torch.softmax(logits, -1) * keep).sum(-1).mean().item())
            p = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
            o = sum(torch.bmm(p[..., i:i + (1 << 17)], v.reshape(S, N, -1)[:, i:i + (1 << 17)].float())
                    for i in range(0, N, 1 << 17)).reshape(ref.shape)
            errs.append(((o - ref).norm() / ref.norm()).item())
        rows.append((kk, statistics.fmean(masses), statistics.fmean(errs)))
    return rows


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20            # ru_maxrss: KiB on Linux


def _make_index(spec, probe_keys, shortlist):
    """``spec``: an index name, or ``fast:key=value,...`` (FastScanIndex arguments, e.g. ``fast:codes=sq8``)."""
    name, _, options = spec.partition(":")
    if options:
        from ..retrieval.index_fast import FastScanIndex
        if name not in ("fast", "auto"):
            raise InvalidArgumentError(f"index options are for the fast index only, got {spec!r}")
        kwargs = {key: ast.literal_eval(value) if value[:1].isdigit() or value[:1] == "-" else value
                  for key, _, value in (item.partition("=") for item in options.split(","))}
        index = FastScanIndex(**kwargs)
    else:
        index = make_index(name)
    if probe_keys is not None and hasattr(index, "probe_keys"):
        index.probe_keys = probe_keys
    if shortlist is not None and hasattr(index, "shortlist"):
        index.shortlist = shortlist
    return index


def run(keys_list, heads, kv_heads, indexes, top_k=100, sink=128, window=512, repeat=5, head_dim=128,
        storage_dtype=torch.bfloat16, decode_queries=4, probe_keys=None, shortlist=None, threads=1, ssd_dir=None,
        out=print):
    out(f"# sparse_attn bench --decode: B=1 Hq={heads} Hkv={kv_heads} D={head_dim}, KV stored as {storage_dtype} in "
        f"CPU RAM, top_k={top_k}, sink={sink}, window={window}, {decode_queries} decode queries x {repeat} rounds; "
        f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads available, retrieval steps with "
        f"{threads}; torch {torch.__version__}")
    out(f"{'keys':>8} {'Hkv':>3} {'index':<12} {'build s':>7} {'step ms':>8} {'exact ms':>8} {'speedup':>7} "
        f"{'recall':>6} {'mass':>6} {'rel err':>7} {'oracle':>7} {'scanned':>7} {'read':>6} {'MB/head':>7} "
        f"{'idx MB/h':>8} {'rss GiB':>7}")
    rows = []
    for N in keys_list:
        need = 2 * 2 * N * head_dim * kv_heads * torch.tensor([], dtype=storage_dtype).element_size()   # KV twice
        avail = _available_bytes()
        if avail is not None and need > 0.8 * avail:
            out(f"# skipped {N} keys x {kv_heads} KV heads: needs ~{need / 2 ** 30:.1f} GiB (workload + cache), "
                f"{avail / 2 ** 30:.1f} GiB available")
            continue
        w = DecodeWorkload(keys=N, kv_heads=kv_heads, q_heads=heads, head_dim=head_dim, decode_rows=decode_queries)
        k, v, q_prefill, q_all = make_decode_workload(w, dtype=storage_dtype)
        scale = head_dim ** -0.5
        queries = [q_all[:, :, r:r + 1].float() for r in range(decode_queries)]
        refs = [exact_decode(qr, k, v, scale) for qr in queries]                 # outputs and logits, for quality
        # a second baseline: exact attention over an fp32 copy (no conversion per step), where it fits in RAM
        fp32_bytes = 2 * k.numel() * 4
        kv32 = None
        if storage_dtype != torch.float32 and (avail is None or fp32_bytes < 0.25 * avail):
            kv32 = (k.float(), v.float())
        out("# top_k guidance at %d keys: attention mass on window + exact top-k offloaded keys (rel err of that "
            "perfect top-k): " % N + ", ".join(f"k={kk}: {m:.3f} ({e:.4f})" for kk, m, e in
                                             _top_k_guidance(refs, v, sink, window, (100, 500, 2048, 8192))))
        for name in indexes:
            use_ssd = name.endswith("+ssd")
            tmp = tempfile.TemporaryDirectory(dir=ssd_dir) if use_ssd else None
            cache = RetrievalKVCache(sink, window, _make_index(name.removesuffix("+ssd"), probe_keys, shortlist),
                                     storage_dtype=storage_dtype, ssd_dir=tmp.name if tmp else None)
            cache.append(k, v)
            cache.observe_queries(q_prefill)
            start = time.perf_counter()
            with intra_op_threads(threads):
                cache.sync_index()
            build_s = time.perf_counter() - start
            # turns: per round, every decode query through retrieval (its thread count) and exact (1 and all threads,
            # over the stored KV and over an fp32 copy where there is one); medians per query
            def on_threads(n, fn):
                def call():
                    with intra_op_threads(n):
                        return [fn(qr) for qr in queries]
                return call

            fns = {"retrieval": on_threads(threads, lambda qr: retrieval_attention(
                qr, cache, top_k, scale=scale, return_indices=True, return_stats=True))}
            exact_threads = sorted({1, torch.get_num_threads()})
            for n in exact_threads:
                fns[f"exact/{n}"] = on_threads(n, lambda qr: exact_decode(qr, k, v, scale))
                if kv32:
                    fns[f"exact32/{n}"] = on_threads(n, lambda qr: exact_decode(qr, *kv32, scale))
            timings = time_in_turns(fns, repeat)
            per_query = {name: timings.median(name) / decode_queries for name in fns}
            results = timings.results["retrieval"]
            step_s = per_query["retrieval"]
            exact_n = min(exact_threads, key=lambda n: per_query[f"exact/{n}"])
            exact_s = per_query[f"exact/{exact_n}"]
            exact32_s = min((per_query[f"exact32/{n}"] for n in exact_threads if kv32), default=float("nan"))
            qual = [_quality(cache, logits, v, ref, o, idx.reshape(logits.shape[0], logits.shape[1], -1), top_k)
                    for (ref, logits), (o, idx, _) in zip(refs, results)]
            recall, mass, err, oracle = (statistics.fmean(x) for x in zip(*qual))
            n_off = max(1, cache.n_offloaded)
            scanned = statistics.fmean(st["scanned"].float().mean().item() for _, _, st in results) / n_off
            read = statistics.fmean(st["read"].float().mean().item() for _, _, st in results) / n_off
            mem = cache.memory_report()
            streams = kv_heads
            row = dict(keys=N, kv_heads=kv_heads, index=name, build_s=build_s, step_ms=step_s * 1e3,
                       exact_stored_ms=exact_s * 1e3, exact_threads=exact_n, exact32_ms=exact32_s * 1e3,
                       exact_ms=min(exact_s, exact32_s) * 1e3, speedup=min(exact_s, exact32_s) / step_s, recall=recall,
                       mass=mass, rel_err=err, oracle_err=oracle, scanned=scanned, read=read,
                       mb_per_head=(mem["ram_keys"] + mem["ram_values"] + mem["ssd_disk"]) / streams / 2 ** 20,
                       index_mb_per_head=mem["index_ram"] / streams / 2 ** 20, peak_rss_gib=_peak_rss_gib())
            rows.append(row)
            out(f"{N:>8} {kv_heads:>3} {name:<12} {build_s:>7.1f} {row['step_ms']:>8.2f} {row['exact_ms']:>8.1f} "
                f"{row['speedup']:>6.1f}x {recall:>6.3f} {mass:>6.3f} {err:>7.4f} {oracle:>7.4f} {scanned:>7.2%} "
                f"{read:>6.2%} {row['mb_per_head']:>7.0f} {row['index_mb_per_head']:>8.1f} {row['peak_rss_gib']:>7.1f}"
                f"   (exact over the stored KV: {row['exact_stored_ms']:.1f} ms with {exact_n} thread(s); over an "
                f"fp32 copy: {row['exact32_ms']:.1f} ms)")
            cache = None                   # free this row's tiers before the next one is built
            if tmp:
                tmp.cleanup()
        k = v = refs = kv32 = None         # free this length's workload before the next one is made
    out("step ms / exact ms = per decode query, medians over rounds (after a warm-up round), timed in turns; exact = fp32 matmul + softmax + "
        "matmul over every key, the faster of: over the stored KV (converted chunk by chunk) and over an fp32 copy "
        "of it (when that fits in RAM), each with its best of 1 or all threads; speedup = exact / step; recall = fraction of the exact top-k keys "
        "(over all keys) attended (window or retrieved); mass = exact attention mass on the attended keys; rel err "
        "= |out - exact| / |exact|; oracle = rel err of the window + the exact top-k offloaded keys (a perfect "
        "index); scanned = keys whose codes (fast) or vectors were scored per query row / offloaded keys; read = "
        "keys read in full per query row (re-ranked shortlist, tail) / offloaded keys; MB/head = stored K + V per "
        "KV head (RAM, + SSD file for +ssd); idx MB/h = index RAM per KV head; rss = peak resident set of the "
        "process so far")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sparse_attn bench --decode", description=__doc__)
    parser.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decode-keys", type=int, nargs="+", default=[131072, 1048576],
                        help="context lengths (keys per KV head)")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--indexes", nargs="+", default=["auto"],
                        help=f"index names ({', '.join(INDEX_NAMES)}), or fast:key=value,... (FastScanIndex "
                             f"arguments); suffix '+ssd': values in a page file")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--storage-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--probe-keys", type=float, default=None, help="fast index: fraction of keys probed")
    parser.add_argument("--shortlist", type=int, default=None, help="fast index: candidates re-ranked per row")
    parser.add_argument("--decode-queries", type=int, default=4, help="decode queries (steps) per round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch/faiss threads for the retrieval steps")
    parser.add_argument("--ssd-dir", default=None, help="where '+ssd' rows put their value files (a temp dir)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    run(args.decode_keys, args.heads, args.kv_heads, args.indexes, args.top_k, args.sink, args.window, args.repeat,
        head_dim=args.head_dim, storage_dtype=getattr(torch, args.storage_dtype), decode_queries=args.decode_queries,
        probe_keys=args.probe_keys, shortlist=args.shortlist, threads=args.threads, ssd_dir=args.ssd_dir, out=emit)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
