"""vLLM served with and without the sparse_attn plugin: time to first token and greedy tokens side by side.

    PYTHONPATH=. flock /tmp/sparse_attn_bench.lock python bench/vllm_serve_bench.py ttft --lengths 16384 32768
    PYTHONPATH=. python bench/vllm_serve_bench.py tokens --tp 1 2

``ttft``: a random-weight Llama (4 layers, hidden 512, 8 query / 2 KV heads, fp32: the issue's baseline model),
each prompt in one prefill chunk.  Variants: ``base`` (vLLM's CPU attention, plugin installed but off), ``vs``
(plugin on, config `VerticalSlash(512, 1024)` on every head), ``default`` (plugin on, no config: the online default
pattern, which sends layers with diffuse attention, as random weights give, back to vLLM).  Each variant is its own
engine process; rounds take the variants in turns (this VM's speed drifts), and every process first runs a
warm-up prompt long enough to take the sparse path.  TTFT = wall time of ``generate(max_tokens=1)`` on a fresh
prompt; the 16 greedy tokens come from a
second call on the same prompt (prefix caching on, so it reuses the prefill's KV).

``tokens``: the issue's equality workload (prompts of 5K and 9K tokens with a 4.5K shared prefix in one batch,
chunked prefill with 2048-token chunks, prefix caching on, 16 new tokens) with vLLM alone and with the plugin at a
budget covering every key, at each tensor-parallel size."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile

import sparse_attn as sa
from sparse_attn.config import SparseConfig
from sparse_attn.integrations.vllm.runner import (EQUALITY_LLM_ARGS, equality_jobs, random_prompts, run_engine,
                                                  save_tiny_llama)

MODEL = {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 2}
VARIANTS = {"base": None, "vs": sa.VerticalSlash(vertical=512, slash=1024), "default": "online"}


def _env(variant, config_path):
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "SPARSE_ATTN_VLLM": None, "SPARSE_ATTN_VLLM_CONFIG": None}
    if VARIANTS[variant] is not None:
        env["SPARSE_ATTN_VLLM"] = "1"
    if isinstance(VARIANTS[variant], sa.Pattern):
        env["SPARSE_ATTN_VLLM_CONFIG"] = config_path
    return env


def ttft(args, tmp, log):
    model = save_tiny_llama(os.path.join(tmp, "model"), **MODEL)
    config_path = os.path.join(tmp, "vs.json")
    SparseConfig.uniform(VARIANTS["vs"], MODEL["layers"], MODEL["heads"]).save(config_path)
    longest = max(args.lengths)
    llm = {"max_model_len": longest + 64, "max_num_batched_tokens": longest + 64, "enable_prefix_caching": True}
    times = {(v, n): [] for v in args.variants for n in args.lengths}
    tokens = {}
    for rnd in range(args.rounds):
        prompts = random_prompts(args.lengths, seed=1 + rnd)          # fresh prompts per round, same for variants
        # warm-up long enough (>= DENSE_BELOW keys) to take the sparse path once: its first call loads the kernel
        jobs = [{"prompts": random_prompts([4608], seed=99), "max_tokens": 1}]
        for ids in prompts:
            jobs += [{"prompts": [ids], "max_tokens": 1}, {"prompts": [ids], "max_tokens": args.new_tokens}]
        for variant in args.variants:
            result = run_engine(model, jobs, env=_env(variant, config_path), llm=llm, timeout=3600)
            if result.returncode:
                sys.exit(f"{variant}: engine failed\n{result.stderr[-4000:]}")
            for i, n in enumerate(args.lengths):
                seconds = result.jobs[1 + 2 * i]["seconds"]
                times[(variant, n)].append(seconds)
                tokens[(variant, n, rnd)] = result.jobs[2 + 2 * i]["tokens"][0]
                log(f"round {rnd} {variant:8s} L={n:6d} ttft {seconds:8.2f} s")
    log("")
    log("| variant | L | TTFT per round (s) | mean | base / variant (per round) | tokens equal to base |")
    log("|---|---|---|---|---|---|")
    for n in args.lengths:
        for variant in args.variants:
            t, b = times[(variant, n)], times.get(("base", n))
            ratio = "/".join(f"{x / y:.2f}x" for x, y in zip(b, t)) if b else ""
            same = [tokens[(variant, n, r)] == tokens.get(("base", n, r)) for r in range(args.rounds)]
            log(f"| {variant} | {n} | {' / '.join(f'{x:.2f}' for x in t)} | {statistics.mean(t):.2f} | {ratio} | "
                f"{sum(same)}/{len(same)} |")
    log("")
    for (variant, n, rnd), toks in sorted(tokens.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        log(f"tokens {variant:8s} L={n} round {rnd}: {toks}")


def equal_tokens(args, tmp, log):
    model = save_tiny_llama(os.path.join(tmp, "model"), layers=2, heads=8)
    full = os.path.join(tmp, "full.json")
    SparseConfig.uniform(sa.VerticalSlash(vertical=1 << 16, slash=1 << 16), 2, 8).save(full)
    jobs, llm = equality_jobs(), EQUALITY_LLM_ARGS
    for tp in args.tp:
        extra = {} if tp == 1 else {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"}
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "SPARSE_ATTN_VLLM_CONFIG": None}
        if tp > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
        runs = {}
        for name, switch in (("vllm", {"SPARSE_ATTN_VLLM": None}),
                             ("plugin", {"SPARSE_ATTN_VLLM": "1", "SPARSE_ATTN_VLLM_CONFIG": full})):
            result = run_engine(model, jobs, env={**env, **switch}, llm={**llm, **extra})
            if result.returncode:
                sys.exit(f"tp={tp} {name}: engine failed\n{result.stderr[-4000:]}")
            runs[name] = result.jobs[0]
            log(f"tp={tp} {name:6s} {result.jobs[0]['seconds']:6.2f} s tokens {result.jobs[0]['tokens']}")
        log(f"tp={tp} greedy tokens equal: {runs['vllm']['tokens'] == runs['plugin']['tokens']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("ttft")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["base", "vs", "default"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    p = sub.add_parser("tokens")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", help="also write the output to this file")
    args = parser.parse_args(argv)
    out = open(args.out, "w") if args.out else None

    def log(line=""):
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    import torch
    import vllm
    log(f"# vllm_serve_bench {args.mode}  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores  torch {torch.__version__}  "
        f"vllm {vllm.__version__}  sparse_attn {sa.__version__}")
    log(f"# args: {json.dumps({k: v for k, v in vars(args).items() if k != 'out'})}")
    with tempfile.TemporaryDirectory() as tmp:
        (ttft if args.mode == "ttft" else equal_tokens)(args, tmp, log)


if __name__ == "__main__":
    main()
