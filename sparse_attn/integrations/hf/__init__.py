"""Switch a loaded transformers model to sparse attention, and back.

    import sparse_attn.hf as sah
    model = sah.patch(model)                      # online default pattern for every head
    model = sah.patch(model, config="heads.json", dense_below=8192)
    sah.unpatch(model)                            # the previous attention implementation, exactly

`patch` registers one attention function (`attention.sparse_attention_forward`) in transformers'
`AttentionInterface` and transformers' flash-attention mask function in `AttentionMaskInterface` under the name
`IMPLEMENTATION` (so no [L, L] mask is built; the function sees a [B, L] padding mask at most), stores the
per-model state on the model and on its attention modules, and calls `model.set_attn_implementation`.  No forward
is rebound.  Every argument and the config are checked before anything changes: on an error the model is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

from ... import prefill
from ...backends import BACKEND_NAMES
from ...config import resolve_config
from ...patterns import Pattern
from .attention import STATE_ATTR, register
from .registry import set_implementation

#: Name of our entry in transformers' attention and mask registries.
IMPLEMENTATION = "sparse_attn"
#: patch(**options) defaults; `pattern` is the online pattern of every head when no config is given.
DEFAULT_OPTIONS = {"dense_below": prefill.DENSE_BELOW, "dense_above": None, "backend": "auto", "pattern": None,
                   "on_layout": None}
#: dense_above when it is not given and no config is: the online defaults must never cost more than dense (the CPU
#: kernel costs ~3x dense attention per computed entry).  With a config the user's patterns are honoured (1.0).
ONLINE_DENSE_ABOVE = 0.3


@dataclass
class PatchState:
    """What a patched model remembers: the resolved config (None: online ``pattern`` on every head), the options,
    the attention implementation to restore, and the model's query heads per layer."""

    config: object
    options: dict
    previous: str | None
    num_heads: int
    num_layers: int = 0
    retrieval: dict | None = None

    def patterns(self, layer_idx, seq_len: int):
        """One pattern per query head of layer ``layer_idx`` for ``seq_len`` keys, or None to run it dense."""
        if self.config is None:
            return [self.options["pattern"] or prefill.DEFAULT_PATTERN] * self.num_heads
        if layer_idx is None:
            return None
        return self.config.patterns_for_layer(layer_idx, seq_len)


def patch(model, config=None, *, retrieval=None, **options):
    """Make ``model`` (a transformers `PreTrainedModel` using the attention registry) run sparse prefill.

    ``config``: None (the online ``pattern`` on every head), a Pattern, a list of one Pattern per query head, a
    `sparse_attn.config.SparseConfig`, a path to a config JSON (ours or MInference's), or a parsed JSON object.
    ``options``: ``dense_below`` (key lengths below it run dense; default `sparse_attn.prefill.DENSE_BELOW`),
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
    opts = _check_options(options)
    text_config = _text_config(model)
    num_layers, num_heads = text_config.num_hidden_layers, text_config.num_attention_heads
    if config is not None and opts["pattern"] is not None:
        raise ValueError("patch: give either config or the pattern option, not both")
    if opts["dense_above"] is None:
        opts["dense_above"] = ONLINE_DENSE_ABOVE if config is None else 1.0
    resolved = resolve_config(config, num_layers, num_heads)
    attention_modules = _attention_modules(model)
    retrieval = _check_retrieval(retrieval, num_layers)

    register(IMPLEMENTATION)
    old = getattr(model, STATE_ATTR, None)
    previous = old.previous if old is not None else model.config._attn_implementation
    state = PatchState(resolved, opts, previous, num_heads, num_layers, retrieval)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except Exception:
        set_implementation(model, previous)
        raise
    for module in [model, *attention_modules]:
        setattr(module, STATE_ATTR, state)
    return model


def unpatch(model):
    """Restore the attention implementation ``model`` had before `patch` and drop the patch state; a model that is
    not patched is returned unchanged.  Returns ``model``."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    set_implementation(model, state.previous)
    for module in model.modules():
        if STATE_ATTR in module.__dict__:
            delattr(module, STATE_ATTR)
    return model


def retrieval_cache(model):
    """A new `RetrievalCache` for one ``generate`` call of a model patched with ``retrieval=``: pass it as
    ``model.generate(ids, cache=retrieval_cache(model))`` (``past_key_values=`` on older transformers 5.x)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None or state.retrieval is None:
        raise ValueError("retrieval_cache: the model is not patched with retrieval; call "
                         "sparse_attn.hf.patch(model, retrieval={...}) first")
    from .decode_cache import RetrievalCache

    return RetrievalCache(num_layers=state.num_layers, **state.retrieval)


def _check_retrieval(retrieval, num_layers: int):
    """``retrieval`` options, checked by building (and dropping) a one-layer cache with them."""
    if retrieval is None:
        return None
    if not isinstance(retrieval, dict):
        raise TypeError(f"retrieval must be None or a dict of RetrievalCache options (top_k, sink, window, index, "
                        f"ssd_dir, ...), got {type(retrieval).__name__}")
    try:
        from .decode_cache import RetrievalCache
    except ImportError as e:
        raise ImportError("patch(retrieval=...) needs transformers 5.x (its CacheLayerMixin cache API)") from e
    try:
        RetrievalCache(num_layers=1, **retrieval)
    except TypeError as e:
        raise TypeError(f"retrieval: {e}") from e
    return dict(retrieval)


def is_patched(model) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def _check_model(model) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - transformers is the hf extra
        raise ImportError("sparse_attn.hf needs transformers: pip install 'sparse_attn[hf]'") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"model: {name} does not use transformers' attention registry "
                         f"(_supports_attention_backend is False), so its attention cannot be switched")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise ValueError(f"model: {name} cannot switch its attention implementation at run time "
                         f"(it does not call ALL_ATTENTION_FUNCTIONS.get_interface)")
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"model: {name} has no set_attn_implementation (transformers too old; need >= 4.53)")


def _attention_modules(model) -> list:
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if not modules:
        raise ValueError(f"model: found no attention modules (modules with a layer_idx) in "
                         f"{type(model).__name__}")
    return modules


def _text_config(model):
    config = model.config
    getter = getattr(config, "get_text_config", None)
    text = getter(decoder=True) if getter is not None else config
    for name in ("num_hidden_layers", "num_attention_heads"):
        if not isinstance(getattr(text, name, None), int):
            raise ValueError(f"model: its config has no integer {name}; cannot map a sparse config to its layers")
    return text


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise TypeError(f"patch: unknown options {unknown}; expected some of {sorted(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **options}
    reasons = []
    below = opts["dense_below"]
    if not isinstance(below, int) or isinstance(below, bool) or below < 0:
        reasons.append(f"dense_below must be an int >= 0, got {below!r}")
    above = opts["dense_above"]
    if above is not None and (not isinstance(above, (int, float)) or isinstance(above, bool) or not 0 < above <= 1):
        reasons.append(f"dense_above must be a number in (0, 1], or None, got {above!r}")
    if opts["backend"] not in BACKEND_NAMES:
        reasons.append(f"backend must be one of {BACKEND_NAMES}, got {opts['backend']!r}")
    if opts["pattern"] is not None and not isinstance(opts["pattern"], Pattern):
        reasons.append(f"pattern must be a Pattern (AShape, VerticalSlash, BlockSparse, Dense) or None, "
                       f"got {type(opts['pattern']).__name__}")
    if opts["on_layout"] is not None and not callable(opts["on_layout"]):
        reasons.append(f"on_layout must be callable(layer_idx, layout, density) or None, got {type(opts['on_layout']).__name__}")
    if reasons:
        raise ValueError("patch: " + "; ".join(reasons))
    return opts
