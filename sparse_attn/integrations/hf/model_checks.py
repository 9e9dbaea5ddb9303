"""What a model's own attention settings mean for `sparse_attn.hf.patch`, decided at patch time: refuse what would
fail at the first forward, and say once what the patch will not change (sliding-window layers).

* Gemma-2's ``attn_logit_softcapping`` runs sparse: the cap is passed to the kernels, every backend but ``"flex"``
  implements it; the retrieval decode path does not, so ``retrieval=`` with a softcap is refused here.
* Attention sinks (gpt-oss's learned ``sinks`` per head) are not implemented: refused here.
* Sliding-window layers keep exact windowed attention once the keys outnumber the window (a layout cannot express a
  per-row window), so on those layers the patterns apply only while the input fits the window: one warning names
  the layers.
"""
from __future__ import annotations

import warnings

from ...backends import BACKENDS
from ...errors import InvalidArgumentError


def softcap_of(text_config) -> float:
    """The model's attention-score cap (Gemma-2's ``attn_logit_softcapping``), 0.0 when it has none."""
    cap = getattr(text_config, "attn_logit_softcapping", None)
    return float(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0 else 0.0


def sliding_layers(text_config) -> dict[int, int]:
    """``{layer: window}`` of the layers attending within a sliding window: ``layer_types`` names them where the
    config has it (Qwen2/3, Gemma-2/3, Qwen2-MoE); otherwise a ``sliding_window`` applies to every layer (Mistral,
    Mixtral, Phi-3, StarCoder2 pass it to each attention call)."""
    window = getattr(text_config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return {}
    types = getattr(text_config, "layer_types", None)
    if types is not None:
        return {i: window for i, kind in enumerate(types) if kind == "sliding_attention"}
    if getattr(text_config, "use_sliding_window", True) is False:
        return {}
    return {i: window for i in range(text_config.num_hidden_layers)}


def check_model_attention(model, text_config, attention_modules, options: dict, retrieval) -> None:
    """Raise ValueError for model settings the patched attention would refuse at the first forward."""
    name = type(model).__name__
    with_sinks = sorted(m.layer_idx for m in attention_modules if getattr(m, "sinks", None) is not None)
    if with_sinks:
        raise InvalidArgumentError(f"model: {name}'s attention has learned sinks (layers {with_sinks}), which sparse_attn does "
                         f"not implement; keep its own attention implementation")
    cap = softcap_of(text_config)
    if not cap:
        return
    if retrieval is not None:
        raise InvalidArgumentError(f"retrieval: {name} soft-caps its attention scores (attn_logit_softcapping={cap}) and the "
                         f"retrieval decode path does not; patch without retrieval=")
    backend = options["backend"]
    if backend != "auto":
        chosen = next(b for b in BACKENDS if b.name == backend)
        if not chosen.supports_softcap:
            able = [b.name for b in BACKENDS if b.supports_softcap]
            raise InvalidArgumentError(f"backend: {backend!r} does not implement softcap, which {name} uses "
                             f"(attn_logit_softcapping={cap}); use 'auto' or one of {able}")


def warn_sliding_layers(model, text_config, dense_below: int) -> None:
    """One warning naming the sliding-window layers and what runs there."""
    layers = sliding_layers(text_config)
    if not layers:
        return
    windows = sorted(set(layers.values()))
    full = [i for i in range(text_config.num_hidden_layers) if i not in layers]
    if max(windows) < dense_below:
        where = (f"they never run sparse: the window ({max(windows)}) is below dense_below ({dense_below}), so "
                 f"shorter inputs run dense and longer ones exact windowed attention")
    else:
        where = ("they run the sparse patterns while the keys fit the window, and exact windowed dense attention "
                 "beyond it")
    others = f"; the sparse patterns apply in full to layers {full}" if full else ""
    warnings.warn(f"sparse_attn.hf.patch: layers {sorted(layers)} of {type(model).__name__} attend within a sliding "
                  f"window of {'/'.join(map(str, windows))} keys: {where}{others}", UserWarning, stacklevel=3)
