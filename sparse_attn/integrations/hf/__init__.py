"""Switch a loaded transformers model to sparse attention, and back.

    import sparse_attn.hf as sah
    model = sah.patch(model)                      # online default pattern for every head
    model = sah.patch(model, config="heads.json", dense_below=8192)
    sah.unpatch(model)                            # the previous attention implementation, exactly

`patch` registers one attention function (`attention.sparse_attention_forward`) in transformers'
`AttentionInterface` and its mask function (`attention.key_padding_mask`) in `AttentionMaskInterface` under the name
`IMPLEMENTATION` (so no [L, L] mask is built; the function sees a [B, L] padding mask at most), stores the
per-model state on the model and on its attention modules, and calls `model.set_attn_implementation`.  No forward
is rebound.  Every argument and the config are checked before anything changes: on an error the model is untouched.
"""
from __future__ import annotations

from ... import prefill
from ...config import resolve_config
from .attention import STATE_ATTR, register_under
from .model_checks import check_model_attention, warn_sliding_layers
from .registry import set_implementation
from .saved_config import FIELD, read_settings, saved_settings, settings_of
from .state import DEFAULT_OPTIONS, ONLINE_DENSE_ABOVE, PatchState, check_options  # noqa: F401 (re-exported)
from ...errors import InvalidArgumentError, InvalidTypeError

#: Name of our entry in transformers' attention and mask registries.
IMPLEMENTATION = "sparse_attn"


def patch(model, config=None, *, retrieval=None, **options):
    """Make ``model`` (a transformers `PreTrainedModel` using the attention registry) run sparse prefill.

    ``config``: None (the online ``pattern`` on every head), a Pattern, a list of one Pattern per query head, a
    `sparse_attn.config.SparseConfig`, a path to a config JSON (ours or MInference's), or a parsed JSON object.
    ``options``: ``dense_below`` (key lengths below it run dense; default None: `sparse_attn.prefill.dense_below_for` the
    inputs' device, 4096 on the CPU and 65536 on CUDA),
    ``dense_above`` (a layer whose estimated layout is denser than this fraction runs dense instead, since the
    sparse kernel costs a few times dense attention per computed entry; 1.0: never; default `ONLINE_DENSE_ABOVE`
    without a config, 1.0 with one, so a given config is followed as written), ``backend`` (as in
    `sparse_attn.sparse_attention`), ``pattern`` (the online default when ``config`` is None), ``on_layout``
    (callable(layer_idx, layout, density) called with each estimated layout; for measuring density).
    ``retrieval``: None, or a dict of `sparse_attn.integrations.hf.decode_cache.RetrievalCache` options (``top_k``, ``sink``,
    ``window``, ``index``, ``ssd_dir``, ...; ``{}`` for the defaults) for `retrieval_cache`: generate with
    ``model.generate(ids, cache=retrieval_cache(model))`` and the prompt runs sparse prefill, every later step
    attends to the device window plus the top-k keys retrieved from the CPU index (transformers 5.x).
    Patching a patched model replaces its config and options.  Returns ``model``."""
    _check_model(model)
    text_config = _text_config(model)
    saved = saved_settings(text_config)
    if saved is not None and config is None and "pattern" not in options:      # the settings saved with the model
        config, saved_options, _ = read_settings(saved)
        options = {**saved_options, **options}
    opts = check_options(options, has_config=config is not None)
    num_layers, num_heads = text_config.num_hidden_layers, text_config.num_attention_heads
    if config is not None and opts["pattern"] is not None:
        raise InvalidArgumentError("patch: give either config or the pattern option, not both")
    resolved = resolve_config(config, num_layers, num_heads)
    attention_modules = _attention_modules(model)
    retrieval = _check_retrieval(retrieval, num_layers)
    check_model_attention(model, text_config, attention_modules, opts, retrieval)

    register()
    old = getattr(model, STATE_ATTR, None)
    previous = old.previous if old is not None else _implementation_to_restore(model, text_config)
    state = PatchState(resolved, opts, previous, num_heads, num_layers, retrieval)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except Exception:
        set_implementation(model, previous)
        raise
    for module in [model, *attention_modules]:
        setattr(module, STATE_ATTR, state)
    setattr(text_config, FIELD, settings_of(state))          # save_pretrained writes it into config.json
    warn_sliding_layers(model, text_config, opts["dense_below"] if opts["dense_below"] is not None
                        else prefill.DENSE_BELOW)
    return model


def unpatch(model):
    """Restore the attention implementation ``model`` had before `patch` (for a model loaded with
    ``attn_implementation="sparse_attn"``: the saved previous one, else its default), drop the patch state and the
    saved settings from its config; a model that runs neither is returned unchanged.  Returns ``model``."""
    state = getattr(model, STATE_ATTR, None)
    if state is None and model.config._attn_implementation != IMPLEMENTATION:
        return model
    text_config = _text_config(model)
    set_implementation(model, state.previous if state is not None else _implementation_to_restore(model, text_config))
    if FIELD in text_config.__dict__:
        delattr(text_config, FIELD)
    for module in model.modules():
        if STATE_ATTR in module.__dict__:
            delattr(module, STATE_ATTR)
    return model


def retrieval_cache(model):
    """A new `RetrievalCache` for one ``generate`` call of a model patched with ``retrieval=``: pass it as
    ``model.generate(ids, cache=retrieval_cache(model))`` (``past_key_values=`` on older transformers 5.x)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None or state.retrieval is None:
        raise InvalidArgumentError("retrieval_cache: the model is not patched with retrieval; call "
                         "sparse_attn.hf.patch(model, retrieval={...}) first")
    from .decode_cache import RetrievalCache

    return RetrievalCache(num_layers=state.num_layers, **state.retrieval)


def _check_retrieval(retrieval, num_layers: int):
    """``retrieval`` options, checked by building (and dropping) a one-layer cache with them."""
    if retrieval is None:
        return None
    if not isinstance(retrieval, dict):
        raise InvalidTypeError(f"retrieval must be None or a dict of RetrievalCache options (top_k, sink, window, index, "
                        f"ssd_dir, ...), got {type(retrieval).__name__}")
    try:
        from .decode_cache import RetrievalCache
    except ImportError as e:
        raise ImportError("patch(retrieval=...) needs transformers 5.x (its CacheLayerMixin cache API)") from e
    try:
        RetrievalCache(num_layers=1, **retrieval)
    except TypeError as e:
        raise InvalidTypeError(f"retrieval: {e}") from e
    return dict(retrieval)


def is_patched(model) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def register() -> None:
    """Register ``"sparse_attn"`` in transformers' attention and mask registries, so that
    ``from_pretrained(..., attn_implementation="sparse_attn")`` and ``set_attn_implementation("sparse_attn")``
    accept it (`patch` does this too; ``import sparse_attn.hf`` calls it)."""
    register_under(IMPLEMENTATION)


def _implementation_to_restore(model, text_config) -> str | None:
    """What unpatch goes back to: the model's current implementation, or where that is ours already (loaded with
    ``attn_implementation="sparse_attn"``), the saved previous one, else sdpa where the model has it, else eager."""
    current = model.config._attn_implementation
    if current != IMPLEMENTATION:
        return current
    saved = saved_settings(text_config)
    previous = saved.get("previous_attn_implementation") if isinstance(saved, dict) else None
    if previous and previous != IMPLEMENTATION:
        return previous
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def _check_model(model) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - transformers is the hf extra
        raise ImportError("sparse_attn.hf needs transformers: pip install 'sparse_attn[hf]'") from e
    if not isinstance(model, PreTrainedModel):
        raise InvalidTypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise InvalidArgumentError(f"model: {name} does not use transformers' attention registry "
                         f"(_supports_attention_backend is False), so its attention cannot be switched")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise InvalidArgumentError(f"model: {name} cannot switch its attention implementation at run time "
                         f"(it does not call ALL_ATTENTION_FUNCTIONS.get_interface)")
    if not hasattr(model, "set_attn_implementation"):
        raise InvalidArgumentError(f"model: {name} has no set_attn_implementation (transformers too old; need >= 4.53)")


def _attention_modules(model) -> list:
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if not modules:
        raise InvalidArgumentError(f"model: found no attention modules (modules with a layer_idx) in "
                         f"{type(model).__name__}")
    return modules


def _text_config(model):
    config = model.config
    getter = getattr(config, "get_text_config", None)
    text = getter(decoder=True) if getter is not None else config
    for name in ("num_hidden_layers", "num_attention_heads"):
        if not isinstance(getattr(text, name, None), int):
            raise InvalidArgumentError(f"model: its config has no integer {name}; cannot map a sparse config to its layers")
    return text
