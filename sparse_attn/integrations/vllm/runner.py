"""Run a vLLM engine in a fresh process and collect greedy tokens and wall times: the harness of the plugin's tests
and of ``bench/vllm_serve_bench.py``.

The plugin's switch is read when vLLM loads its plugins, once per process, and vLLM keeps global state, so each
engine (with or without the plugin, one tensor-parallel size) gets its own process:

    result = run_engine(model_dir, jobs=[{"prompts": [ids_a, ids_b], "max_tokens": 16}],
                        env={"SPARSE_ATTN_VLLM": "1"}, llm={"max_num_batched_tokens": 2048})
    result.jobs[0]["tokens"]      # one list of new token ids per prompt
    result.jobs[0]["seconds"]     # wall time of that generate call

`save_tiny_llama` writes a random-weight Llama (no tokenizer) that vLLM serves with ``skip_tokenizer_init``."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

#: LLM(...) arguments every run shares (the model has no tokenizer; fp32 so tokens can be compared exactly)
BASE_LLM_ARGS = {"skip_tokenizer_init": True, "dtype": "float32", "enforce_eager": True, "seed": 0}
#: The issue's equality workload: prompts of 5K and 9K tokens sharing a 4.5K prefix, in one batch, with 2048-token
#: prefill chunks (later chunks read earlier ones from the paged cache, the second prompt starts on a prefix-cache hit,
#: steps mix one request's decode with the other's prefill) and 16 greedy tokens each.
EQUALITY_LLM_ARGS = {"max_num_batched_tokens": 2048, "enable_chunked_prefill": True, "enable_prefix_caching": True,
                     "max_model_len": 10240}


def equality_jobs() -> list:
    return [{"prompts": random_prompts([5000, 9000], shared=4500), "max_tokens": 16}]


@dataclass
class EngineResult:
    returncode: int
    jobs: list          # per job: {"tokens": [[int]] one per prompt, "seconds": float}
    stderr: str


def save_tiny_llama(path, *, layers=2, hidden=256, heads=8, kv_heads=2, vocab=1024, seed=0) -> str:
    """Save a random-weight LlamaForCausalLM (`sparse_attn.tools.tiny_model.tiny_llama`) to ``path``; returns
    ``path``."""
    from ...tools.tiny_model import tiny_llama

    model = tiny_llama(layers, hidden, heads, kv_heads, vocab, seed=seed)
    model.config.max_position_embeddings = 65536
    model.save_pretrained(path)
    return str(path)


def random_prompts(lengths, *, shared=0, vocab=1024, seed=0) -> list:
    """One list of token ids per length in ``lengths``, all starting with the same ``shared`` random tokens (a
    common prefix, for prefix caching), the rest random per prompt."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(shared)]
    return [prefix + [rng.randrange(vocab) for _ in range(n - shared)] for n in lengths]


def run_engine(model, jobs, *, env=None, llm=None, timeout=900) -> EngineResult:
    """Start vLLM on ``model`` in a new Python process with ``env`` added to this process's environment (None
    values remove a variable) and ``llm`` added to `BASE_LLM_ARGS`; run each job's prompts (lists of token ids)
    in one ``generate`` call with greedy sampling and ``max_tokens``.  A failing start gives a nonzero
    ``returncode`` and the error in ``stderr``."""
    child_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = str(value)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump({"model": str(model), "llm": {**BASE_LLM_ARGS, **(llm or {})}, "jobs": jobs,
                       "out": out_path}, f)
        proc = subprocess.run([sys.executable, "-m", __name__, spec_path], env=child_env, capture_output=True,
                              text=True, timeout=timeout)
        results = []
        if proc.returncode == 0:
            with open(out_path) as f:
                results = json.load(f)
    return EngineResult(proc.returncode, results, proc.stderr)


def _serve(spec_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(spec_path) as f:
        spec = json.load(f)
    engine = LLM(model=spec["model"], **spec["llm"])
    results = []
    for job in spec["jobs"]:
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, detokenize=False)
        start = time.perf_counter()
        outputs = engine.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        results.append({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "seconds": seconds})
    with open(spec["out"], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":        # vLLM starts workers by spawn: the engine must not start on import
    _serve(sys.argv[1])
