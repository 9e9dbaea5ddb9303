"""vLLM V1 plugin: sparse prefill inside vLLM (``vllm.general_plugins`` entry point ``sparse_attn``).

    SPARSE_ATTN_VLLM=1 [SPARSE_ATTN_VLLM_CONFIG=heads.json] python serve.py

vLLM calls `register` in every process it starts (front end, engine core, tensor-parallel workers).  Switched off
(the default) it returns at once and vLLM runs exactly as without the package.  Switched on it reads and checks the
config (errors surface while the engine config is built, before any worker exists), points the platform's attention
backend at ours (`cpu_backend.SparseCPUAttentionBackend` on CPU), and checks the served model when vLLM checks its
engine config.  See docs/vllm.md."""
from __future__ import annotations

from .settings import CONFIG_ENV, SWITCH_ENV, PluginConfigError, check_model, enabled, load_settings

__all__ = ["CONFIG_ENV", "SWITCH_ENV", "PluginConfigError", "register"]

_BACKEND = "sparse_attn.integrations.vllm.cpu_backend.SparseCPUAttentionBackend"


def register() -> None:
    """The entry point.  Safe to call more than once per process."""
    if not enabled():
        return
    load_settings()                                  # a bad config fails here, in the process building the engine
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        raise PluginConfigError(f"{SWITCH_ENV}=1: the sparse_attn vLLM plugin runs on vLLM's CPU platform only so "
                                f"far (this is {type(current_platform).__name__}); unset {SWITCH_ENV}")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    register_backend(AttentionBackendEnum.CPU_ATTN, _BACKEND)
    _check_models_at_config_time(type(current_platform))


def _check_models_at_config_time(platform_cls) -> None:
    """Wrap the platform's ``check_and_update_config`` (called once the engine config, with the model's, exists)
    with `check_model`, so a config for another model or an unservable model fails there with one message."""
    original = platform_cls.__dict__["check_and_update_config"].__func__
    if getattr(original, "_sparse_attn_checked", False):
        return

    def check_and_update_config(cls, vllm_config):
        check_model(vllm_config)
        return original(cls, vllm_config)

    check_and_update_config._sparse_attn_checked = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)
