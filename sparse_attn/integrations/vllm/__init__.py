"""vLLM V1 plugin: sparse prefill inside vLLM (``vllm.general_plugins`` entry point ``sparse_attn``).

    SPARSE_ATTN_VLLM=1 [SPARSE_ATTN_VLLM_CONFIG=heads.json] python serve.py

vLLM calls `register` in every process it starts (front end, engine core, tensor-parallel workers).  Switched off
(the default) it returns at once and vLLM runs exactly as without the package.  Switched on it reads and checks the
config (errors surface while the engine config is built, before any worker exists), points the platform's attention
backend at ours (`cpu_backend.SparseCPUAttentionBackend` on CPU, `cuda_backend.SparseFlashAttentionBackend` in
place of FlashAttention on CUDA: written, not yet run on a GPU), and checks the served model when vLLM checks its
engine config.  See docs/vllm.md."""
from __future__ import annotations

from .settings import CONFIG_ENV, SWITCH_ENV, PluginConfigError, check_model, enabled, load_settings

__all__ = ["CONFIG_ENV", "SWITCH_ENV", "PluginConfigError", "backend_for", "register"]

#: per platform: the vLLM attention backend the plugin takes the place of, and ours
BACKENDS = {"cpu": ("CPU_ATTN", "sparse_attn.integrations.vllm.cpu_backend.SparseCPUAttentionBackend"),
            "cuda": ("FLASH_ATTN", "sparse_attn.integrations.vllm.cuda_backend.SparseFlashAttentionBackend")}


def backend_for(platform) -> tuple[str, str]:
    """``(vLLM backend name, our backend's class path)`` for vLLM platform object ``platform``; PluginConfigError
    on a platform the plugin does not serve.  (CUDA: written, not yet run on a GPU.)"""
    for kind, backend in BACKENDS.items():
        if getattr(platform, f"is_{kind}")():
            return backend
    raise PluginConfigError(f"{SWITCH_ENV}=1: the sparse_attn vLLM plugin serves vLLM's CPU and CUDA platforms "
                            f"(this is {type(platform).__name__}); unset {SWITCH_ENV}")


def register() -> None:
    """The entry point.  Safe to call more than once per process."""
    if not enabled():
        return
    load_settings()                                  # a bad config fails here, in the process building the engine
    from vllm.platforms import current_platform
    name, path = backend_for(current_platform)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    register_backend(AttentionBackendEnum[name], path)
    _check_models_at_config_time(type(current_platform), name)


def ask_for_backend(vllm_config, name: str) -> None:
    """Where the platform chooses among several attention backends (CUDA), ask for ``name``, the one the plugin
    replaces; a different backend chosen by the user is an error (the plugin would silently do nothing)."""
    attention = getattr(vllm_config, "attention_config", None)
    if attention is None or name == "CPU_ATTN":      # the CPU platform has one backend
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    if attention.backend is None:
        attention.backend = AttentionBackendEnum[name]
    elif attention.backend != AttentionBackendEnum[name]:
        raise PluginConfigError(f"{SWITCH_ENV}=1: the sparse_attn plugin runs inside vLLM's {name} attention "
                                f"backend, but {attention.backend.name} was asked for; drop that choice or unset "
                                f"{SWITCH_ENV}")


def _check_models_at_config_time(platform_cls, backend_name: str) -> None:
    """Wrap the platform's ``check_and_update_config`` (called once the engine config, with the model's, exists)
    with `check_model` (and `ask_for_backend`), so a config for another model or an unservable model fails there
    with one message."""
    original = platform_cls.__dict__["check_and_update_config"].__func__
    if getattr(original, "_sparse_attn_checked", False):
        return

    def check_and_update_config(cls, vllm_config):
        check_model(vllm_config)
        ask_for_backend(vllm_config, backend_name)
        return original(cls, vllm_config)

    check_and_update_config._sparse_attn_checked = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)
