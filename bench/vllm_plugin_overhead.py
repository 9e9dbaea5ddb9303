"""What the vLLM plugin costs where it should change nothing: one attention layer's prefill with diffuse attention
(random queries and keys), vLLM's CPU_ATTN forward against the plugin's forward with the online default pattern
(which must send the layer back to vLLM), in turns, in one process, no engine.

    PYTHONPATH=. flock /tmp/sparse_attn_bench.lock python bench/vllm_plugin_overhead.py --lengths 16384 32768

Shapes are the serve bench's model (8 query / 2 KV heads, head dim 64, fp32) with vLLM's CPU block size (128) and
one thread (what vLLM's worker gets on a 2-core machine).  Workloads per length: the whole prompt in one chunk, and
the prompt in chunks of ``--chunk`` tokens (vLLM's default on CPU is 4096 for ``LLM``, 2048 for the API server),
each chunk one forward call over all keys so far, a fresh plugin layer per prompt (as a new request would get).
Besides the totals it sums the plugin's own parts (keys read from the paged cache, the density check); the
plugin's output must equal vLLM's bit for bit (the check sends the layer to vLLM's kernel)."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from types import SimpleNamespace

import torch
import vllm
import vllm.v1.attention.backends.cpu_attn as cpu_attn
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

import sparse_attn as sa
from sparse_attn.integrations.vllm import cpu_backend, sparse_layer
from sparse_attn.tools.cli import line_printer
from sparse_attn.integrations.vllm.synthetic_batch import fill_paged_cache, step_metadata

HQ, HKV, D, BLOCK = 8, 2, 64, 128
PARTS = {(cpu_backend, "read_request_keys"): "keys read", (sparse_layer, "_mass_needs_dense"): "density check"}


def _install_part_timers(sums):
    for (module, attr), name in PARTS.items():
        fn = getattr(module, attr)

        def timed(*a, _fn=fn, _name=name, **kw):
            start = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                sums[_name] = sums.get(_name, 0.0) + time.perf_counter() - start
        setattr(module, attr, timed)


def _prefill(impl_cls, query, cache, steps):
    """Run ``steps`` [(query rows, key length)] of one request through a fresh layer of ``impl_cls``; returns the
    output rows and the seconds of the forward calls."""
    impl = impl_cls(HQ, D, D ** -0.5, HKV, None, None, "auto")
    if isinstance(impl, cpu_backend.SparseCPUAttentionImpl):
        impl.__dict__["_heads"] = slice(0, HQ)            # tensor-parallel rank 0 of 1 (no process group here)
    output = torch.empty(query.shape[0], HQ * D)
    seconds, done = 0.0, 0
    for rows, seq_len in steps:
        meta = step_metadata([(rows, seq_len)], cache, num_heads=HQ)
        q, out = query[done:done + rows], output[done:done + rows]
        start = time.perf_counter()
        impl.forward(cache.layer, q, None, None, cache.kv_cache, meta, out)
        seconds += time.perf_counter() - start
        done += rows
    return output, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the output to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = line_printer(args.out)

    config = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    cpu_attn.get_current_vllm_config = lambda: config          # what an engine would have set up
    parts = {}
    _install_part_timers(parts)
    log(f"# vllm_plugin_overhead  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)  "
        f"torch {torch.__version__}  vllm {vllm.__version__}  sparse_attn {sa.__version__}  load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    log(f"# args: {vars(args)}")
    gen = torch.Generator().manual_seed(0)
    workloads = []
    for n in args.lengths:
        cache = fill_paged_cache([n], num_kv_heads=HKV, head_dim=D, block_size=BLOCK, generator=gen)
        query = torch.randn(n, HQ, D, generator=gen)
        chunked = [(min(args.chunk, n - s), min(s + args.chunk, n)) for s in range(0, n, args.chunk)]
        workloads += [(n, "one chunk", cache, query, [(n, n)]),
                      (n, f"chunks of {args.chunk}", cache, query, chunked)]
    # vLLM twice: how far two runs of the same thing differ here (the machine's noise floor)
    variants = {"vllm": CPUAttentionBackendImpl, "plugin": cpu_backend.SparseCPUAttentionImpl,
                "vllm-again": CPUAttentionBackendImpl}
    times = {}
    for rnd in range(args.rounds):
        order = list(variants)[rnd % 3:] + list(variants)[:rnd % 3]          # each variant first in turn
        for n, name, cache, query, steps in workloads:
            outputs = {}
            for variant in order:
                parts.clear()
                outputs[variant], seconds = _prefill(variants[variant], query, cache, steps)
                times.setdefault((n, name, variant), []).append(seconds)
                own = "  ".join(f"{k} {v:.3f} s" for k, v in parts.items())
                log(f"round {rnd} L={n:6d} {name:15s} {variant:10s} {seconds:7.3f} s  {own}")
            same = all(torch.equal(outputs["vllm"], o) for o in outputs.values())
            log(f"round {rnd} L={n:6d} {name:15s} outputs all equal: {same}")
    log("")
    log("| L | workload | variant | per round (s) | median (s) | / vLLM per round | median ratio |")
    log("|---|---|---|---|---|---|---|")
    for n, name, *_ in workloads:
        base = times[(n, name, "vllm")]
        for variant in variants:
            t = times[(n, name, variant)]
            ratios = [x / b for x, b in zip(t, base)]
            log(f"| {n} | {name} | {variant} | {' / '.join(f'{x:.2f}' for x in t)} | {statistics.median(t):.2f} | "
                f"{' / '.join(f'{r:.3f}' for r in ratios)} | {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
