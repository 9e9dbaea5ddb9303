"""transformers' attention registry, used one way by every part of the package: register an attention function
(with a mask function, so no ``[Lq, Lk]`` mask is built for it) and switch a model's implementation."""
from __future__ import annotations


def register_attention(name: str, function, mask="flash_attention_2") -> str:
    """Register ``function`` under ``name`` in ``AttentionInterface``, and ``mask`` (the name of a registered mask
    function, or a mask function) under the same name (transformers >= 4.53; older versions build masks from the
    config alone).  Registering again replaces."""
    from transformers import AttentionInterface
    AttentionInterface.register(name, function)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return name
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask] if isinstance(mask, str) else mask)
    return name


def set_implementation(model, name) -> None:
    """Switch ``model`` to the attention implementation ``name``; ``None`` leaves it unresolved (as a model is
    before its first forward), which is how a switch is undone when the model had not resolved one."""
    if name is None:
        model.config._attn_implementation_internal = None
    elif hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:                                                 # older transformers: the config decides per call
        model.config._attn_implementation = name
