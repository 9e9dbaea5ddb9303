"""Recording each layer's post-RoPE queries and keys during one forward of a transformers model."""
from __future__ import annotations

import contextlib
import contextvars

from ..integrations.hf.registry import register_attention, set_implementation
from ..errors import InvalidArgumentError

CAPTURE_NAME = "sparse_attn_calibrate"
# The callback of the innermost active `capture_attention` block.  The registered function stays registered
# (transformers has no public way to unregister); outside a block it is plain SDPA.
_ACTIVE = contextvars.ContextVar("sparse_attn_calibrate_capture", default=None)


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    active = _ACTIVE.get()
    if active is not None:
        on_layer, calls = active
        layer_idx = getattr(module, "layer_idx", None)
        on_layer(calls[0] if layer_idx is None else layer_idx, query.detach(), key.detach(), kwargs.get("scaling"))
        calls[0] += 1
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def capture_attention(model, on_layer):
    """Within the block, every attention call of ``model`` passes ``(layer_idx, query, key, scaling)`` to
    ``on_layer`` and then runs SDPA.  The previous attention implementation is restored on exit, also on error."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise InvalidArgumentError(f"model ({type(model).__name__}) is not a transformers model with an attention registry")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if not getattr(model, "_supports_attention_backend", True) or (can_set is not None and not can_set()):
        raise InvalidArgumentError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         f"AttentionInterface, so its queries and keys cannot be recorded")
    previous = config._attn_implementation
    register_attention(CAPTURE_NAME, _capturing_attention, mask="sdpa")
    token = _ACTIVE.set((on_layer, [0]))
    try:
        set_implementation(model, CAPTURE_NAME)
        yield
    finally:
        _ACTIVE.reset(token)
        set_implementation(model, previous)


def model_shape(model) -> tuple[int, int]:
    """(layers, query heads per layer) of a transformers decoder model, from its (text) config."""
    cfg = model.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return cfg.num_hidden_layers, cfg.num_attention_heads
