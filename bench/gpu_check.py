"""One-command GPU check for a borrowed H100/H200: ``PYTHONPATH=. python bench/gpu_check.py`` (< 5 minutes).

1. Correctness of backends triton and cuda against the fp32 oracle (`reference_attention` with the layout's mask)
   in bf16 and fp16 on awkward shapes; tolerance as DESIGN section 8: error <= 2x plain torch's in that dtype.
2. Llama-3-8B prefill shapes (B=1, Hq=32, Hkv=8, D=128, bf16) at 4K, 32K, 128K on the synthetic workload: dense
   SDPA (causal, GQA; as torch picks its backend and pinned to flash: speedups are against the faster), compiled
   FlexAttention on the same layout (its aligned block cover), `sparse_prefill` (the user's one call), and ours
   (estimate + attention, attention alone; backends triton and cuda) for VerticalSlash(1000, 6096) and the
   default pattern: density, ms (CUDA events, after warmup), density-scaled TFLOPS, speedups; and the estimate
   with the sample scored by the Triton kernels vs by torch ("estimate (triton scores)" / "(torch scores)").

Every stage runs in try/except (a failure becomes a table row); a time budget skips what would not fit (largest
length first).  Rows are appended to ``bench/results/<device>-<date>.csv`` as they finish (versions and device
in every row) and the table is printed at the end.  ``--smoke`` runs the same code on the CPU at tiny sizes
with backend torch (and triton under TRITON_INTERPRET=1) so the script cannot rot; tests/test_gpu_check_smoke.py
runs it.  Needs no faiss/usearch and nothing from the internet.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.tools.synthetic import Workload, make_qkv

FIELDS = ["stage", "length", "pattern", "impl", "backend", "dtype", "shape", "density", "ms", "tflops",
          "speedup_vs_dense", "vs_flex", "max_err", "plain_err", "ok", "note", "device", "torch", "triton", "cupy",
          "date"]
# B, Hq, Hkv, Lq, Lk, D: lengths off the block grid, Lq < Lk, MHA / GQA / MQA, head dims 64/80/128
CHECK_SHAPES = [(2, 4, 2, 65, 113, 64), (1, 4, 1, 1, 63, 128), (2, 2, 2, 113, 1000, 80), (1, 8, 2, 1000, 1000, 128)]
SMOKE_SHAPES = [(2, 4, 2, 65, 113, 64), (1, 4, 1, 1, 63, 32)]


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


class Report:
    """Rows for the table and the CSV (appended as they come, so a killed run keeps what it measured)."""

    def __init__(self, path: Path, env: dict):
        self.path, self.env, self.rows = path, env, []
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()

    def add(self, **row):
        row = {**{k: "" for k in FIELDS}, **self.env, **row}
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        print("  " + " ".join(f"{k}={_fmt(row[k])}" for k in FIELDS[:16] if row[k] != ""), flush=True)

    def table(self) -> str:
        cols = ["stage", "length", "pattern", "impl", "backend", "dtype", "shape", "density", "ms", "tflops",
                "speedup_vs_dense", "vs_flex", "max_err", "plain_err", "ok", "note"]
        cells = [[_fmt(r[c]) for c in cols] for r in self.rows]
        width = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        width[-1] = min(width[-1], 60)
        lines = [" ".join(c.ljust(w) for c, w in zip(cols, width))]
        lines += [" ".join(v[:w].ljust(w) for v, w in zip(row, width)) for row in cells]
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:                      # absent or broken: recorded, not fatal
        return f"absent ({type(e).__name__})"


def _error_note(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:300]


# ---------------------------------------------------------------------------------------------------- timing
def timer(device: torch.device, repeat: int, seconds: float = 1.0):
    """Median ms of ``fn`` after two warmup calls (the first compiles, the second sizes the run): CUDA events on a
    GPU, perf_counter on the CPU; at most ``repeat`` timed calls, fewer when they would take over ``seconds``."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def measure(fn):
        fn()                                     # compiles, autotunes, fills caches
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        warm = time.perf_counter() - t0
        times = []
        for _ in range(max(1, min(repeat, int(seconds / max(warm, 1e-6))))):
            if device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    return measure


# ---------------------------------------------------------------------------------------------------- correctness
def plain_attention(q, k, v, mask, causal):
    """Dense attention written out in q's dtype: the 'plain torch' error baseline (NaN rows where nothing is seen)."""
    Hq, Hkv, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    s = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    rows = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    allowed = mask & (torch.arange(Lk, device=q.device)[None, :] <= rows) if causal else mask
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv, allowed.any(-1)


def check_correctness(report: Report, device, backends, dtypes, shapes, budget: Budget):
    for shape in shapes:
        B, Hq, Hkv, Lq, Lk, D = shape
        gen = torch.Generator().manual_seed(sum(shape))
        q32, k32, v32 = (torch.randn(B, H, L, D, generator=gen).to(device)
                         for H, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
        layout = sa.estimate(q32, k32, sa.VerticalSlash(vertical=16, slash=48, sink=4, local=32))   # unaligned
        mask = layout.to_mask()
        ref = sa.reference_attention(q32, k32, v32, mask, causal=True)
        for dtype in dtypes:
            q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
            plain, seen = plain_attention(q, k, v, mask, causal=True)
            plain_err = (plain.float() - ref).abs()[seen].max().item() if seen.any() else 0.0
            for backend in backends:
                row = dict(stage="correctness", backend=backend, dtype=str(dtype).replace("torch.", ""),
                           shape="x".join(map(str, shape)), density=layout.density(), plain_err=plain_err)
                if budget.left() < 5:
                    report.add(**row, ok="skipped", note="time budget")
                    continue
                try:
                    out = sa.sparse_attention(q, k, v, layout, backend=backend, check_layout=False)
                    err = (out.float() - ref).abs()[seen].max().item() if seen.any() else 0.0
                    unseen_zero = bool((out[~seen] == 0).all())
                    ok = math.isfinite(err) and err <= 2 * plain_err + 1e-5 and unseen_zero
                    report.add(**row, max_err=err, ok="PASS" if ok else "FAIL",
                               note="" if unseen_zero else "rows with no visible key are not 0")
                except Exception as e:
                    report.add(**row, ok="ERROR", note=_error_note(e))


def check_scores(report: Report, device, dtypes, shapes, budget: Budget):
    """The estimator score kernels (column / diagonal mass of the last 64 queries, with sink and local bands,
    both diagonal reductions) against the torch reference on the same inputs; stage "scores"."""
    from sparse_attn.estimators.sample_mass import column_mass, diagonal_mass, last_query_probs
    from sparse_attn.estimators.triton_scores import scores_not_supported_reasons, triton_sample_scores

    for shape in shapes:
        B, Hq, Hkv, Lq, Lk, D = shape
        gen = torch.Generator().manual_seed(sum(shape) + 1)
        q32, k32 = (torch.randn(B, H, L, D, generator=gen).to(device) for H, L in ((Hq, Lq), (Hkv, Lk)))
        sink = torch.full((Hq,), 4, device=device)
        local = torch.arange(Hq, device=device) * 16
        keys = torch.arange(Lk, device=device)
        for dtype in dtypes:
            q, k = q32.to(dtype), k32.to(dtype)
            probs, pos = last_query_probs(q.float(), k.float(), 64, D ** -0.5, True)       # same rounded inputs
            near = (pos[:, None] - keys >= 0) & (pos[:, None] - keys < local[:, None, None])
            ref = (column_mass(probs), column_mass(probs * ~near),
                   diagonal_mass(probs * (keys >= sink[:, None])[:, None], pos))
            for gather in (True, False):
                row = dict(stage="scores", impl="sample scores", dtype=str(dtype).replace("torch.", ""),
                           backend=f"triton ({'gather' if gather else 'atomics'})", shape="x".join(map(str, shape)))
                reasons = scores_not_supported_reasons(q, k, 64)
                if reasons or budget.left() < 5:
                    report.add(**row, ok="skipped", note="; ".join(reasons) or "time budget")
                    continue
                try:
                    got = triton_sample_scores(q, k, 64, D ** -0.5, True, sink=sink, local=local, use_gather=gather)
                    err = max((a - e).abs().max().item() for a, e in zip(
                        (got.column, got.column_off_local, got.diagonal), ref))
                    limit = 1e-4 if dtype == torch.float32 else 1e-3     # summation order only (masses sum to 64)
                    report.add(**row, max_err=err, ok="PASS" if err <= limit else "FAIL", note=f"limit {limit}")
                except Exception as e:
                    report.add(**row, ok="ERROR", note=_error_note(e))


# ---------------------------------------------------------------------------------------------------- performance
def dense_variants(q, k, v) -> dict:
    """Causal GQA SDPA as torch picks it ("sdpa default": cuDNN-class on Hopper, 1.9-2.0x the flash backend at 16K
    on an H200) and pinned to the flash backend where it takes the inputs: name -> callable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = q.shape[1] != k.shape[1]

    def default():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return {"sdpa default": default, "flash": flash}


def causal_flops(B, H, L, D) -> float:
    return 4.0 * B * H * D * L * (L + 1) / 2


def run_length(report: Report, L: int, cfg: dict, patterns: dict, backends, device, budget: Budget, measure):
    B, Hq, Hkv, D, dtype = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["dtype"]
    base = dict(stage="perf", length=L, dtype=str(dtype).replace("torch.", ""), shape=f"{B}x{Hq}x{Hkv}x{L}x{D}")
    t0 = time.perf_counter()
    q, k, v = make_qkv(Workload(batch=B, q_heads=Hq, kv_heads=Hkv, seq_len=L, head_dim=D, dtype=dtype), device)
    flops = causal_flops(B, Hq, L, D)
    report.add(**base, impl="inputs", note=f"synthetic workload generated in {time.perf_counter() - t0:.1f} s")
    dense = {}                                       # the baseline of every speedup: the faster dense variant
    for which, fn in dense_variants(q, k, v).items():
        try:
            dense[which] = measure(fn)
            report.add(**base, impl="dense sdpa", backend=which, density=1.0, ms=dense[which],
                       tflops=flops / dense[which] / 1e9)
        except Exception as e:
            report.add(**base, impl="dense sdpa", backend=which, ok="ERROR", note=_error_note(e))
    dense_ms = min(dense.values()) if dense else None
    for name, pattern in patterns.items():
        row = dict(base, pattern=name)
        try:
            layout = sa.estimate(q, k, pattern)
            density = layout.density()
            est_ms = measure(lambda: sa.estimate(q, k, pattern))
            report.add(**row, impl="estimate", density=density, ms=est_ms)
        except Exception as e:
            report.add(**row, impl="estimate", ok="ERROR", note=_error_note(e))
            continue
        estimate_by_scores(report, row, q, k, pattern, measure)
        flex_ms = None
        if cfg["flex"] and budget.left() > 60:
            try:
                flex_ms, flex_density, compile_s = flex_time(q, k, v, layout, measure)
                report.add(**row, impl="flex (compiled)", density=flex_density, ms=flex_ms,
                           tflops=flops * flex_density / flex_ms / 1e9,
                           speedup_vs_dense=dense_ms / flex_ms if dense_ms else "",
                           note=f"aligned block cover of the layout; compile {compile_s:.1f} s")
            except Exception as e:
                report.add(**row, impl="flex (compiled)", ok="ERROR", note=_error_note(e))
        else:
            report.add(**row, impl="flex (compiled)", ok="skipped", note="smoke run" if not cfg["flex"] else
                       "time budget")
        prefill_rows(report, row, q, k, v, pattern, dense_ms, measure)
        for backend in backends:
            if budget.left() < 10:
                report.add(**row, impl="attention", backend=backend, ok="skipped", note="time budget")
                continue
            try:
                attn_ms = measure(lambda: sa.sparse_attention(q, k, v, layout, backend=backend, check_layout=False))
                report.add(**row, impl="attention", backend=backend, density=density, ms=attn_ms,
                           tflops=flops * density / attn_ms / 1e9,
                           speedup_vs_dense=dense_ms / attn_ms if dense_ms else "",
                           vs_flex=flex_ms / attn_ms if flex_ms else "")
                both_ms = measure(lambda: sa.sparse_attention(q, k, v, sa.estimate(q, k, pattern), backend=backend,
                                                              check_layout=False))
                report.add(**row, impl="estimate+attention", backend=backend, density=density, ms=both_ms,
                           tflops=flops * density / both_ms / 1e9,
                           speedup_vs_dense=dense_ms / both_ms if dense_ms else "")
            except Exception as e:
                report.add(**row, impl="attention", backend=backend, ok="ERROR", note=_error_note(e))
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prefill_rows(report: Report, row: dict, q, k, v, pattern, dense_ms, measure):
    """`sparse_prefill`, the user's one call (backend "auto", dense guard), with the device's default
    ``dense_below`` and with 0 (always estimate): rows "prefill (default dense_below)" / "prefill (dense_below=0)"."""
    from sparse_attn.prefill import dense_below_for

    for below, impl in ((None, f"prefill (dense_below={dense_below_for(q.device)})"), (0, "prefill (dense_below=0)")):
        try:
            ms = measure(lambda: sa.sparse_prefill(q, k, v, pattern, dense_below=below))
            report.add(**row, impl=impl, backend="auto", ms=ms, speedup_vs_dense=dense_ms / ms if dense_ms else "")
        except Exception as e:
            report.add(**row, impl=impl, backend="auto", ok="ERROR", note=_error_note(e))


def estimate_by_scores(report: Report, row: dict, q, k, pattern, measure):
    """VerticalSlash estimate time with the sample scored by the Triton kernels vs by torch (`ops.scores`): rows
    "estimate (triton scores)" / "estimate (torch scores)"; the note says the ratio and whether the layouts agree.
    `Auto` is measured by its first vertical-slash rung (the estimate every head of it starts with).  Other
    patterns, and the triton scores off CUDA without TRITON_INTERPRET=1, are skipped."""
    if isinstance(pattern, sa.Auto):
        pattern = pattern.vertical_slash(k.shape[2])
    if not isinstance(pattern, sa.VerticalSlash):
        return
    from sparse_attn.estimators.triton_scores import scores_not_supported_reasons

    Hq = q.shape[1]
    heads = torch.arange(Hq, device=q.device)

    def build(scores):
        return type(pattern).build([pattern] * Hq, heads, q, k, causal=True, scale=q.shape[-1] ** -0.5,
                                   block_m=64, block_n=64, scores_backend=scores)

    times, masks = {}, {}
    for scores in ("triton", "torch"):
        impl = f"estimate ({scores} scores)"
        reasons = scores_not_supported_reasons(q, k, pattern.last_q) if scores == "triton" else []
        if reasons:
            report.add(**row, impl=impl, ok="skipped", note="; ".join(reasons))
            continue
        try:
            layout = build(scores)
            times[scores] = measure(lambda: build(scores))
            masks[scores] = (layout.block_count, layout.column_count, layout.density())
            note = ""
            if scores == "torch" and "triton" in times:
                same = all(torch.equal(a, b) for a, b in zip(masks["triton"][:2], masks["torch"][:2]))
                note = (f"triton scores {times['torch'] / times['triton']:.2f}x faster; counts "
                        f"{'equal' if same else 'DIFFER'}, density {masks['triton'][2]:.4f} vs {masks['torch'][2]:.4f}")
            report.add(**row, impl=impl, backend=scores, density=layout.density(), ms=times[scores], note=note)
        except Exception as e:
            report.add(**row, impl=impl, backend=scores, ok="ERROR", note=_error_note(e))


def flex_time(q, k, v, layout, measure):
    """(ms, density of the aligned block cover FlexAttention computes, compile seconds)."""
    from torch.nn.attention.flex_attention import flex_attention
    from sparse_attn.backends.flex.attention import kernel_options

    block_mask = layout.to_flex_block_mask(cover=True)
    flex = torch.compile(flex_attention, dynamic=False)
    kw = dict(block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1],
              kernel_options=kernel_options(layout, q.device))
    start = time.perf_counter()
    flex(q, k, v, **kw)
    if q.is_cuda:
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    ms = measure(lambda: flex(q, k, v, **kw))
    cover = sa.SparseLayout.from_block_mask(layout.to_block_mask(causal=True), layout.q_len, layout.k_len,
                                            layout.block_m, layout.block_n)
    return ms, cover.density(), compile_s


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, backend torch (+ triton when "
                                                             "TRITON_INTERPRET=1): checks the script itself")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run (default 270)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--heads", type=int, nargs=2, default=None, metavar=("HQ", "HKV"),
                        help="query and KV heads of the performance shapes (default 32 8, Llama-3-8B)")
    parser.add_argument("--skip-correctness", action="store_true", help="performance rows only")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    budget = Budget(args.budget)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --smoke for the CPU check of this script", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    device_name = "cpu-smoke" if smoke else torch.cuda.get_device_name()
    env = dict(device=device_name, torch=torch.__version__, triton=_version("triton"),
               cupy=_version("cupy") if not smoke else "not imported (smoke)",
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    path = Path(args.out) / f"{re.sub(r'[^A-Za-z0-9]+', '-', device_name).strip('-')}-{stamp}.csv"
    report = Report(path, env)
    print(f"# gpu_check on {device_name}: torch {env['torch']}, triton {env['triton']}, cupy {env['cupy']}")

    if smoke:
        backends = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
        check_dtypes = [torch.float32, torch.float16]
        cfg = dict(B=1, Hq=4, Hkv=2, D=64, dtype=torch.float32, flex=False)
        lengths = args.lengths or [256, 512]
        patterns = {"vs_1000_6096": sa.VerticalSlash(vertical=1000, slash=6096), "default": sa.DEFAULT_PATTERN}
        shapes, measure = SMOKE_SHAPES, timer(device, repeat=1)
    else:
        backends = ["triton", "cuda"]
        check_dtypes = [torch.bfloat16, torch.float16]
        cfg = dict(B=1, Hq=32, Hkv=8, D=128, dtype=torch.bfloat16, flex=True)
        lengths = args.lengths or [4096, 32768, 131072]
        patterns = {"vs_1000_6096": sa.VerticalSlash(vertical=1000, slash=6096), "default": sa.DEFAULT_PATTERN}
        shapes, measure = CHECK_SHAPES, timer(device, repeat=5)

    if args.heads:
        cfg.update(Hq=args.heads[0], Hkv=args.heads[1])
    if args.skip_correctness:
        shapes = []
    stage_start = time.perf_counter()
    try:
        check_correctness(report, device, backends, check_dtypes, shapes, budget)
    except Exception as e:
        report.add(stage="correctness", ok="ERROR", note=_error_note(e))
        traceback.print_exc()
    try:
        check_scores(report, device, check_dtypes[:1], shapes, budget)     # bf16 on a GPU: few compiles
    except Exception as e:
        report.add(stage="scores", ok="ERROR", note=_error_note(e))
        traceback.print_exc()
    print(f"# correctness stage: {time.perf_counter() - stage_start:.1f} s", flush=True)

    previous = None                                  # (length, seconds) of the last length run
    for L in sorted(lengths):
        # Skip a length that would not fit: predict from the previous one.  Its time is mostly compiles and input
        # generation (fixed or linear in L) plus sparse kernels (~linear); dense SDPA (quadratic) is a small part,
        # so x L-ratio ^ 0.75 plus 20 s is the estimate (4K -> 32K -> 128K: x4.8, x2.8).
        need = 20.0 + (previous[1] * (L / previous[0]) ** 0.75 if previous else 0.0)
        if budget.left() < need:
            report.add(stage="perf", length=L, ok="skipped",
                       note=f"time budget: {budget.left():.0f} s left, ~{need:.0f} s needed")
            continue
        t0 = time.perf_counter()
        try:
            run_length(report, L, cfg, patterns, backends, device, budget, measure)
        except Exception as e:
            report.add(stage="perf", length=L, ok="ERROR", note=_error_note(e))
            traceback.print_exc()
        previous = (L, time.perf_counter() - t0)
        print(f"# length {L}: {previous[1]:.1f} s", flush=True)

    print()
    print(report.table())
    print(f"\n# tflops = density x causal dense FLOPs (4 B H D L(L+1)/2) / time; speedup_vs_dense = the faster dense sdpa row's ms / ms; "
          f"vs_flex = flex ms / attention ms (same layout)\n# CSV: {path}")
    failed = [r for r in report.rows if r["ok"] in ("FAIL", "ERROR")]
    print(f"# {len(failed)} rows failed or errored" if failed else "# no failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
