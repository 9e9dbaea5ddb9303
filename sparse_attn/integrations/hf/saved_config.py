"""The patch settings saved with a model: `patch` writes them into the model's (text) config as the field
``sparse_attn``, so ``save_pretrained`` puts them in ``config.json``, and they come back with ``from_pretrained``:

    {"format": "sparse_attn.hf", "version": 1,
     "config": {...} or null,            # the per-layer/per-head config (our schema), null: the online pattern
     "pattern": {...} or null,           # the online pattern (a head object of our schema), null: the default
     "dense_below": null, "dense_above": 0.3, "backend": "auto",   # null: the device's default
     "previous_attn_implementation": "sdpa"}

A model loaded with ``from_pretrained(path, attn_implementation="sparse_attn")`` (after ``import sparse_attn.hf``,
which registers the name) runs with these settings (online defaults without the field): the attention function
builds the state from its module's config at its first call (`state_for_module`).  ``patch(model)`` without a
config on a model carrying the field uses the saved settings; arguments given to ``patch`` override them.
``on_layout`` and ``retrieval`` are not saved (a callable and a per-run cache).
"""
from __future__ import annotations

from ...config import SparseConfig, pattern_from_json, pattern_to_json, resolve_config
from .state import PatchState, check_options
from ...errors import InvalidArgumentError

FIELD = "sparse_attn"
FORMAT = "sparse_attn.hf"
VERSION = 1
#: patch options that are saved (the others are per-run objects)
SAVED_OPTIONS = ("dense_below", "dense_above", "backend")
_KEYS = {"format", "version", "config", "pattern", "previous_attn_implementation", *SAVED_OPTIONS}


def settings_of(state: PatchState) -> dict:
    """The JSON object saved for a patch state."""
    pattern = state.options["pattern"]
    return {"format": FORMAT, "version": VERSION,
            "config": None if state.config is None else state.config.to_json(),
            "pattern": None if pattern is None else pattern_to_json(pattern),
            **{name: state.options[name] for name in SAVED_OPTIONS},
            "previous_attn_implementation": state.previous}


def read_settings(obj) -> tuple:
    """``(config, options, previous)`` from a saved object: config a `SparseConfig` or None, options the saved
    patch options (and ``pattern``).  ValueError naming the field when the object is bad."""
    where = f"the model config's {FIELD!r} field"
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InvalidArgumentError(f"{where} must be an object with \"format\": {FORMAT!r}, got {obj!r:.200}")
    if obj.get("version") != VERSION:
        raise InvalidArgumentError(f"{where}: unsupported version {obj.get('version')!r} (this reader knows {VERSION})")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise InvalidArgumentError(f"{where}: unknown keys {unknown}")
    config = None if obj.get("config") is None else SparseConfig.load(obj["config"])
    options = {name: obj[name] for name in SAVED_OPTIONS if name in obj}
    if obj.get("pattern") is not None:
        options["pattern"] = pattern_from_json(obj["pattern"], f"{where}, 'pattern'")
    return config, options, obj.get("previous_attn_implementation")


def saved_settings(text_config):
    """The saved object on a model's (text) config, or None."""
    return getattr(text_config, FIELD, None)


def state_for_module(module) -> PatchState | None:
    """The patch state of an attention module of a model that runs our implementation without having been patched
    in this process (loaded with ``attn_implementation="sparse_attn"``): its config's saved settings, or the online
    defaults.  None when the module has no config to read the model's shape from."""
    config = getattr(module, "config", None)
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    if not isinstance(layers, int) or not isinstance(heads, int):
        return None
    saved = saved_settings(config)
    sparse_config, options, previous = read_settings(saved) if saved is not None else (None, {}, None)
    options = check_options(options, has_config=sparse_config is not None)
    return PatchState(resolve_config(sparse_config, layers, heads), options, previous, heads, layers)
