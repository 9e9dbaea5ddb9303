"""The plugin's switch, config loading and model checks (no vLLM needed: these run in the main suite)."""
from types import SimpleNamespace

import pytest

import sparse_attn as sa
from sparse_attn.config import SparseConfig
from sparse_attn.integrations.vllm import settings
from sparse_attn.integrations.vllm.settings import PluginConfigError


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(settings.SWITCH_ENV, raising=False)
    monkeypatch.delenv(settings.CONFIG_ENV, raising=False)
    settings._load.cache_clear()
    yield
    settings._load.cache_clear()


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("1", True), (" 1 ", True)])
def test_switch_values(monkeypatch, value, on):
    if value is not None:
        monkeypatch.setenv(settings.SWITCH_ENV, value)
    assert settings.enabled() is on


@pytest.mark.parametrize("value", ["yes", "true", "2"])
def test_switch_typo_is_an_error(monkeypatch, value):
    monkeypatch.setenv(settings.SWITCH_ENV, value)
    with pytest.raises(PluginConfigError, match="SPARSE_ATTN_VLLM must be 1"):
        settings.enabled()


def test_register_does_nothing_when_off(monkeypatch):
    """Installed but off: register() returns before importing vLLM (so it cannot change vLLM's state)."""
    import sys
    from sparse_attn.integrations.vllm import register
    monkeypatch.setitem(sys.modules, "vllm", None)         # any import of vllm would raise ImportError
    monkeypatch.setenv(settings.SWITCH_ENV, "0")
    register()


def test_no_config_means_online_default_with_dense_guard():
    s = settings.load_settings()
    assert s.config is None and s.dense_above == settings.ONLINE_DENSE_ABOVE
    assert s.patterns(0, 8192, slice(4, 8), 4) == [sa.DEFAULT_PATTERN] * 4


def test_config_heads_split_by_rank(monkeypatch, tmp_path):
    heads = [sa.VerticalSlash(vertical=64 * (h + 1), slash=512) for h in range(8)]
    cfg = SparseConfig(2, 8, [None, heads])
    cfg.save(tmp_path / "c.json")
    monkeypatch.setenv(settings.CONFIG_ENV, str(tmp_path / "c.json"))
    s = settings.load_settings()
    assert s.dense_above == 1.0
    assert s.patterns(0, 8192, slice(0, 4), 4) is None                 # the config keeps layer 0 dense
    assert s.patterns(1, 8192, slice(4, 8), 4) == heads[4:]             # rank 1 of 2 takes heads 4..7


def test_missing_config_file(monkeypatch, tmp_path):
    monkeypatch.setenv(settings.CONFIG_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(PluginConfigError, match="no such file"):
        settings.load_settings()


def test_unknown_pattern_names_the_head(monkeypatch, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"0": ["vertical_and_slosh", 100, 800, 0.9]}]')
    monkeypatch.setenv(settings.CONFIG_ENV, str(path))
    with pytest.raises(PluginConfigError, match=r"SPARSE_ATTN_VLLM_CONFIG=.*vertical_and_slosh"):
        settings.load_settings()


def _vllm_config(layers=2, heads=8, tp=1, use_mla=False):
    text = SimpleNamespace(num_hidden_layers=layers, num_attention_heads=heads)
    return SimpleNamespace(model_config=SimpleNamespace(model="tiny", use_mla=use_mla, hf_text_config=text),
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp))


def test_check_model(monkeypatch, tmp_path):
    SparseConfig.uniform(sa.VerticalSlash(), 2, 8).save(tmp_path / "c.json")
    monkeypatch.setenv(settings.CONFIG_ENV, str(tmp_path / "c.json"))
    settings.check_model(_vllm_config())                                           # fits
    with pytest.raises(PluginConfigError, match="not for model 'tiny'.*3 layers, the config has 2"):
        settings.check_model(_vllm_config(layers=3))
    with pytest.raises(PluginConfigError, match="16 query heads per layer, the config has 8"):
        settings.check_model(_vllm_config(heads=16))
    with pytest.raises(PluginConfigError, match="multi-head latent attention"):
        settings.check_model(_vllm_config(use_mla=True))
    with pytest.raises(PluginConfigError, match="do not split over tensor_parallel_size=3"):
        settings.check_model(_vllm_config(tp=3))


def _platform(kind):
    return SimpleNamespace(**{f"is_{k}": (lambda k=k: k == kind) for k in ("cpu", "cuda", "rocm", "tpu", "xpu")})


@pytest.mark.parametrize("kind, name, cls", [("cpu", "CPU_ATTN", "cpu_backend.SparseCPUAttentionBackend"),
                                             ("cuda", "FLASH_ATTN", "cuda_backend.SparseFlashAttentionBackend")])
def test_backend_chosen_by_platform(kind, name, cls):
    from sparse_attn.integrations.vllm import backend_for
    assert backend_for(_platform(kind)) == (name, f"sparse_attn.integrations.vllm.{cls}")


@pytest.mark.parametrize("kind", ["rocm", "tpu", "xpu"])
def test_other_platforms_are_refused_by_name(kind):
    from sparse_attn.integrations.vllm import backend_for
    with pytest.raises(PluginConfigError, match="CPU and CUDA platforms.*unset SPARSE_ATTN_VLLM"):
        backend_for(_platform(kind))


def test_dense_below_defaults_to_the_device_break_even():
    from sparse_attn import prefill
    assert settings.Settings(None).dense_below_on("cpu") == prefill.dense_below_for("cpu")
    assert settings.Settings(None).dense_below_on("cuda") == prefill.dense_below_for("cuda")
    assert prefill.dense_below_for("cpu") != prefill.dense_below_for("cuda")     # else this test shows nothing
    assert settings.Settings(None, dense_below=128).dense_below_on("cuda") == 128
