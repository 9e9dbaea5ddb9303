"""The plugin's switch and config, read from the environment, and the startup checks against the served model.

``SPARSE_ATTN_VLLM=1`` turns the plugin on (unset, empty or ``0``: off; anything else is an error, so a typo does
not silently serve dense).  ``SPARSE_ATTN_VLLM_CONFIG=<path>`` names a config JSON (ours or MInference's, see
`sparse_attn.config`) covering every query head of every layer of the model; each tensor-parallel rank takes its
own contiguous slice of heads, as vLLM splits them.  Without a config every head runs the online default pattern
and a layer whose estimated layout is denser than `ONLINE_DENSE_ABOVE` runs vLLM's own attention instead.
Workers inherit the environment, so every process reads the same settings."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from ... import prefill
from ...config import SparseConfig

SWITCH_ENV = "SPARSE_ATTN_VLLM"
CONFIG_ENV = "SPARSE_ATTN_VLLM_CONFIG"
#: As in `sparse_attn.hf.patch`: the online defaults must never cost more than dense; a given config is followed.
ONLINE_DENSE_ABOVE = 0.3


class PluginConfigError(ValueError):
    """The plugin is switched on with settings that cannot serve the model (raised before any worker starts).
    vLLM may wrap it (pydantic's ValidationError around the engine config): the message starts with `PREFIX`."""

    PREFIX = "sparse_attn vLLM plugin: "

    def __init__(self, message: str):
        super().__init__(self.PREFIX + message)


@dataclass(frozen=True)
class Settings:
    """What every process of a run uses: the config (None: the online default pattern on every head), the key
    length below which a prefill runs vLLM's own attention (None: the device's break-even,
    `prefill.dense_below_for`: 4096 keys on the CPU, 65536 on CUDA), and the density above which it does too."""

    config: SparseConfig | None
    dense_below: int | None = None
    dense_above: float = 1.0

    def dense_below_on(self, device_type: str) -> int:
        return prefill.dense_below_for(device_type) if self.dense_below is None else self.dense_below

    def patterns(self, layer_idx: int, seq_len: int, heads: slice, num_heads: int):
        """The patterns of query heads ``heads`` (this rank's slice) of layer ``layer_idx`` for ``seq_len`` keys, or
        None when the layer runs dense."""
        if self.config is None:
            return [prefill.DEFAULT_PATTERN] * num_heads
        patterns = self.config.patterns_for_layer(layer_idx, seq_len)
        return None if patterns is None else patterns[heads]


def enabled() -> bool:
    value = os.environ.get(SWITCH_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise PluginConfigError(f"{SWITCH_ENV} must be 1 (on) or 0 / unset (off), got {value!r}")


@lru_cache(maxsize=None)
def _load(path: str | None) -> Settings:
    if path is None:
        return Settings(None, dense_above=ONLINE_DENSE_ABOVE)
    if not os.path.isfile(path):
        raise PluginConfigError(f"{CONFIG_ENV}={path!r}: no such file")
    try:
        return Settings(SparseConfig.load(path))
    except ValueError as e:
        raise PluginConfigError(f"{CONFIG_ENV}={path!r}: {e}") from None


def load_settings() -> Settings:
    """The settings named by the environment (parsed once per process); PluginConfigError on a bad config."""
    return _load(os.environ.get(CONFIG_ENV) or None)


def check_model(vllm_config) -> None:
    """PluginConfigError, in the process that builds the engine config, when the plugin cannot serve this model:
    a model vLLM runs with MLA, a config written for another shape, heads that tensor parallelism cannot split."""
    model_config = vllm_config.model_config
    if model_config is None:
        return
    name = model_config.model
    if getattr(model_config, "use_mla", False):
        raise PluginConfigError(f"{SWITCH_ENV}=1: model {name!r} uses multi-head latent attention (MLA), which the "
                                f"sparse_attn plugin does not serve; unset {SWITCH_ENV} to serve it with vLLM's "
                                f"own attention")
    text = model_config.hf_text_config
    num_layers = getattr(text, "num_hidden_layers", None)
    num_heads = getattr(text, "num_attention_heads", None)
    if not isinstance(num_layers, int) or not isinstance(num_heads, int):
        raise PluginConfigError(f"{SWITCH_ENV}=1: model {name!r} ({type(text).__name__}) has no integer "
                                f"num_hidden_layers / num_attention_heads; the sparse_attn plugin serves decoder "
                                f"models with standard attention only")
    tp = vllm_config.parallel_config.tensor_parallel_size
    if num_heads % tp:
        raise PluginConfigError(f"{SWITCH_ENV}=1: {num_heads} query heads do not split over "
                                f"tensor_parallel_size={tp}")
    settings = load_settings()
    if settings.config is not None:
        try:
            settings.config.check_model(num_layers, num_heads)
        except ValueError as e:
            raise PluginConfigError(f"{CONFIG_ENV}={os.environ.get(CONFIG_ENV)!r} is not for model {name!r}: {e}") \
                from None
