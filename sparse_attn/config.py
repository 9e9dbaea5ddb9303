"""Per-layer, per-head pattern configs: which pattern each query head runs (with its budgets), which layers stay
dense; JSON in and out in two schemas.

**Our schema** (``format="sparse_attn"``)::

    {"format": "sparse_attn.config", "version": 1,
     "num_layers": 2, "num_heads": 4,
     "reference_length": 16384,              # optional (null): the length the budgets are given for, see below
     "metadata": {...},                      # optional, free-form (calibration settings, model name)
     "layers": [
        "dense",                             # a layer kept dense (null is read the same way)
        [ {"pattern": "vertical_slash", "vertical": 1000, "slash": 6096, ..., "score": 0.97},   # one per head
          {"pattern": "a_shape", "sink": 128, "local": 3968},
          {"pattern": "block_sparse", "top_k": 100, "gamma": null},
          {"pattern": "dense"} ] ]}

A head's object names its pattern (``vertical_slash`` = `VerticalSlash`, ``a_shape`` = `AShape`, ``block_sparse`` =
`BlockSparse`, ``dense`` = `Dense`) and gives any of that dataclass's fields (the others keep their defaults);
``score`` (optional) is the attention recall calibration measured for the head.  The modality-aware patterns
(docs/modality.md) are ``grid`` = `Grid`, ``q_boundary`` = `QBoundary`, ``two_d_boundary`` = `TwoDBoundary`, with
any of their fields except ``modality``: spans describe one input, so a config never holds them (a ``modality``
field is rejected); they are passed per call (``sparse_attn.hf.modality(spans)``, `with_modality`).

**MInference / vLLM schema** (``format="minference"``, the ``sparse_attention_config`` of MInference's
``best_pattern`` files and vLLM's dual-chunk attention): a list with one dict per layer,
``{"<head>": [type, vertical, slash, score], ...}``.  Types map to our patterns:

* ``"vertical_and_slash", v, s`` -> ``VerticalSlash(vertical=v, slash=s, sink=min(64, v), local=min(64, s))``
  (v key columns, s diagonals, fixed budgets);
* ``"stream_llm", v, s`` -> ``AShape(sink=v, local=s)`` (MInference's streaming kernel: ``n_init=v`` first keys
  and a local window of ``n_local=s`` keys);
* ``"block_sparse", v, s`` -> ``BlockSparse(top_k=v)`` (MInference's own kernel ignores both numbers and keeps
  100 blocks of 64; we read ``v`` as the number of key blocks, 100 when it is 0, and write ``top_k`` there);
* ``"dense", 0, 0`` -> ``Dense()``: our extension (MInference and vLLM do not know it); a layer whose heads are all
  dense is a dense layer.

``score`` is kept as the head's score (0 when unknown).  The schema has no type for the modality patterns:
writing a config that uses one raises ValueError naming the layer and head.  Writing this schema drops what it
cannot express (``gamma``, ``last_q``, ``sink``/``local`` of vertical-slash, ``reference_length``), with a warning.

**Length scaling.**  With ``reference_length`` set, the budgets are for inputs of that many tokens and scale
linearly with the key length ``seq_len`` (constant density): a budget ``b`` becomes
``max(ceil(b * seq_len / reference_length), min(b, floor))``, with ``floor`` 64 keys for key budgets
(`VerticalSlash` and the modality patterns: ``vertical``, ``slash``, ``min_vertical``, ``min_slash``; `AShape`
``local``) and 1 block for
`BlockSparse` ``top_k``; fixed sizes (``sink``, vertical-slash ``local``, ``last_q``, ``gamma``, Grid's ``stride``,
``width``, ``frames``, ``min_stride``) do not scale, and
``vertical >= sink``, ``slash >= local`` still hold.  Without ``reference_length`` budgets are used as written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field

from .patterns import AShape, Auto, BlockSparse, Dense, Pattern, VerticalSlash
from .patterns.modality import MODALITY_PATTERNS, _ModalityPattern
from .patterns.base import patterns_per_head
from .patterns.vertical_slash import VerticalSlashBudgets
from .errors import InvalidArgumentError, InvalidTypeError

FORMAT = "sparse_attn.config"
VERSION = 1
#: our pattern names <-> dataclasses
PATTERN_NAMES = {"vertical_slash": VerticalSlash, "a_shape": AShape, "block_sparse": BlockSparse, "dense": Dense,
                 "auto": Auto, **MODALITY_PATTERNS}
NAME_OF = {cls: name for name, cls in PATTERN_NAMES.items()}
#: MInference type -> our pattern class
MINFERENCE_TYPES = {"vertical_and_slash": VerticalSlash, "stream_llm": AShape, "block_sparse": BlockSparse,
                    "dense": Dense}
#: fields that scale with the input length, and the floor they keep (keys, or blocks for top_k)
_VS_SCALED = {"vertical": 64, "slash": 64, "min_vertical": 64, "min_slash": 64}
SCALED_FIELDS = {VerticalSlash: _VS_SCALED, AShape: {"local": 64}, BlockSparse: {"top_k": 1}, Dense: {},
                 **{cls: _VS_SCALED for cls in MODALITY_PATTERNS.values()}}
#: a modality pattern's field that a config never holds: spans describe one input, not a model
SPANS_FIELD = "modality"
_MAX_REASONS = 20


@dataclass
class SparseConfig:
    """Patterns per layer: ``layers[i]`` is None (layer ``i`` runs dense) or a list of ``num_heads`` patterns, one
    per query head.  ``scores`` (optional) mirrors ``layers`` with each head's calibration score (recall)."""

    num_layers: int
    num_heads: int
    layers: list
    reference_length: int | None = None
    scores: list | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        reasons = _shape_reasons(self)
        if reasons:
            raise InvalidArgumentError("invalid SparseConfig: " + "; ".join(reasons[:_MAX_REASONS]))
        # A layer whose heads are all Dense is a dense layer: one spelling, so equality means equal behaviour.
        self.layers = [None if heads is None or all(isinstance(p, Dense) for p in heads) else list(heads)
                       for heads in self.layers]
        self._scaled: dict = {}

    # ------------------------------------------------------------------ use
    def patterns_for_layer(self, layer_idx: int, seq_len: int) -> list[Pattern] | None:
        """None when layer ``layer_idx`` runs dense; else one pattern per query head, budgets scaled to a key
        length of ``seq_len`` (see the module docstring)."""
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise InvalidArgumentError(f"layer_idx must be an int in [0, {self.num_layers}), got {layer_idx!r}")
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise InvalidArgumentError(f"seq_len must be a positive int, got {seq_len!r}")
        heads = self.layers[layer_idx]
        if heads is None or self.reference_length is None:
            return None if heads is None else list(heads)
        key = (layer_idx, seq_len)
        if key not in self._scaled:
            if len(self._scaled) > 4096:                      # many distinct lengths: do not grow without bound
                self._scaled.clear()
            self._scaled[key] = [scale_pattern(p, seq_len / self.reference_length) for p in heads]
        return list(self._scaled[key])

    def check_model(self, num_layers: int, num_heads: int) -> None:
        """ValueError naming expected vs found layers / query heads when the config does not fit the model."""
        reasons = []
        if num_layers != self.num_layers:
            reasons.append(f"the model has {num_layers} layers, the config has {self.num_layers}")
        if num_heads != self.num_heads:
            reasons.append(f"the model has {num_heads} query heads per layer, the config has {self.num_heads}")
        if reasons:
            raise InvalidArgumentError("sparse config does not match the model: " + "; ".join(reasons))

    @property
    def dense_layers(self) -> list[int]:
        return [i for i, heads in enumerate(self.layers) if heads is None]

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(cls, pattern, num_layers: int, num_heads: int, **kwargs) -> "SparseConfig":
        """Every layer runs ``pattern`` (one Pattern for every head, or a list of ``num_heads`` patterns)."""
        heads = patterns_per_head(pattern, num_heads)
        return cls(num_layers, num_heads, [list(heads) for _ in range(num_layers)], **kwargs)

    # ------------------------------------------------------------------ JSON
    def to_json(self, format: str = "sparse_attn"):
        """The config as a JSON-ready object in ``format`` ("sparse_attn" or "minference")."""
        if format == "sparse_attn":
            return _to_ours(self)
        if format == "minference":
            return _to_minference(self)
        raise InvalidArgumentError(f"format must be 'sparse_attn' or 'minference', got {format!r}")

    def save(self, path, format: str = "sparse_attn") -> None:
        """Write the config as JSON to ``path`` in ``format`` ("sparse_attn" or "minference")."""
        obj = self.to_json(format)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1 if format == "sparse_attn" else None)
            f.write("\n")

    @classmethod
    def load(cls, source) -> "SparseConfig":
        """A config from a JSON file path, or from an already parsed JSON object; the schema (ours or
        MInference's) is detected.  ValueError naming the layer / head / field on a bad file."""
        where = ""
        if isinstance(source, (str, os.PathLike)):
            where = f" ({source})"
            try:
                with open(source) as f:
                    source = json.load(f)
            except json.JSONDecodeError as e:
                raise InvalidArgumentError(f"sparse config{where} is not valid JSON: {e}") from None
        try:
            if isinstance(source, dict):
                return _from_ours(source)
            if isinstance(source, list):
                return _from_minference(source)
        except ValueError as e:
            raise InvalidArgumentError(f"{e}{where}") from None
        raise InvalidArgumentError(f"sparse config{where} must be a JSON object (sparse_attn schema) or a list of layers "
                         f"(MInference schema), got {type(source).__name__}")


def resolve_config(config, num_layers: int, num_heads: int) -> SparseConfig | None:
    """The SparseConfig for a model with ``num_layers`` layers of ``num_heads`` query heads from what a user passes:
    None (-> None: online defaults), a Pattern or a list of one Pattern per query head (every layer), a
    SparseConfig, a JSON file path, or a parsed JSON object.  ValueError when it does not fit the model."""
    if config is None:
        return None
    if isinstance(config, SparseConfig):
        resolved = config
    elif isinstance(config, Pattern):
        resolved = SparseConfig.uniform(config, num_layers, num_heads)
    elif isinstance(config, (list, tuple)) and config and all(isinstance(p, Pattern) for p in config):
        resolved = SparseConfig.uniform(list(config), num_layers, num_heads)
    elif isinstance(config, (str, os.PathLike, dict, list)):
        resolved = SparseConfig.load(config)
    else:
        raise InvalidTypeError(f"config must be None, a Pattern, a list of Patterns, a SparseConfig, a JSON path or a "
                        f"parsed JSON object; got {type(config).__name__}")
    resolved.check_model(num_layers, num_heads)
    return resolved


def scale_pattern(pattern: Pattern, factor: float) -> Pattern:
    """``pattern`` with its length-dependent budgets multiplied by ``factor`` (seq_len / reference_length),
    rounded up, and kept at or above ``min(budget, floor)``; see the module docstring."""
    changes = {}
    for name, floor in SCALED_FIELDS.get(type(pattern), {}).items():
        value = getattr(pattern, name)
        if value is not None:
            changes[name] = max(math.ceil(value * factor), min(value, floor))
    if isinstance(pattern, VerticalSlashBudgets):
        changes["vertical"] = max(changes["vertical"], pattern.sink)
        changes["slash"] = max(changes["slash"], pattern.local)
    return dataclasses.replace(pattern, **changes) if changes else pattern


# ---------------------------------------------------------------------------------------------------- checks
def empty_budget_reason(pattern) -> str | None:
    """Why a head running ``pattern`` would attend to no key at all (an all-zero output), or None.  A model's config
    never wants that; the pattern objects allow it (`AShape(0, 0)` and `VerticalSlash(0, 0, sink=0, local=0)` are
    the empty layout in kernel tests)."""
    if isinstance(pattern, AShape) and pattern.sink == 0 and pattern.local == 0:
        return "AShape sink and local are both 0, so the head would keep no key (an all-zero output)"
    if type(pattern) is VerticalSlash and pattern.vertical == 0 and pattern.slash == 0:
        return ("VerticalSlash vertical and slash are both 0, so the head would keep no key (an all-zero output); "
                "give vertical >= 1 or slash >= 1")
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _shape_reasons(cfg: SparseConfig) -> list[str]:
    reasons = []
    if not _is_count(cfg.num_layers):
        reasons.append(f"num_layers must be a positive int, got {cfg.num_layers!r}")
    if not _is_count(cfg.num_heads):
        reasons.append(f"num_heads must be a positive int, got {cfg.num_heads!r}")
    if cfg.reference_length is not None and not _is_count(cfg.reference_length):
        reasons.append(f"reference_length must be a positive int or None, got {cfg.reference_length!r}")
    if not isinstance(cfg.metadata, dict):
        reasons.append(f"metadata must be a dict, got {type(cfg.metadata).__name__}")
    if not isinstance(cfg.layers, (list, tuple)):
        return reasons + [f"layers must be a list, got {type(cfg.layers).__name__}"]
    if reasons:
        return reasons
    if len(cfg.layers) != cfg.num_layers:
        reasons.append(f"layers has {len(cfg.layers)} entries, num_layers is {cfg.num_layers}")
    for i, heads in enumerate(cfg.layers):
        if heads is None:
            continue
        if not isinstance(heads, (list, tuple)):
            reasons.append(f"layer {i}: must be None (dense) or a list of patterns, got {type(heads).__name__}")
        elif len(heads) != cfg.num_heads:
            reasons.append(f"layer {i}: has {len(heads)} heads, expected num_heads={cfg.num_heads}")
        else:
            reasons += [f"layer {i}, head {h}: not a Pattern ({type(p).__name__})"
                        for h, p in enumerate(heads) if not isinstance(p, Pattern)]
            reasons += [f"layer {i}, head {h}: {why}" for h, p in enumerate(heads)
                        if (why := empty_budget_reason(p)) is not None]
            reasons += [f"layer {i}, head {h}: {type(p).__name__} carries modality spans; a config holds patterns "
                        f"without spans (spans belong to one input: pass them per call with "
                        f"sparse_attn.hf.modality(spans) or sparse_attn.patterns.with_modality)"
                        for h, p in enumerate(heads) if isinstance(p, _ModalityPattern) and p.modality is not None]
    if cfg.scores is not None:
        if not isinstance(cfg.scores, (list, tuple)) or len(cfg.scores) != cfg.num_layers:
            reasons.append(f"scores must be None or a list of {cfg.num_layers} entries (one per layer)")
        else:
            for i, row in enumerate(cfg.scores):
                if row is not None and (not isinstance(row, (list, tuple)) or len(row) != cfg.num_heads):
                    reasons.append(f"scores, layer {i}: must be None or {cfg.num_heads} numbers")
    return reasons


def _field_type_reason(cls, name: str, value) -> str | None:
    """Why ``value`` does not fit the type of field ``name`` of pattern class ``cls`` (None if it does)."""
    declared = str({f.name: f.type for f in dataclasses.fields(cls)}[name])
    if declared == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if declared == "str":                           # a choice (e.g. BlockSparse.scoring): the pattern checks which
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if value is None:
        return None if "None" in declared else f"must not be null ({declared})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number ({declared}), got {type(value).__name__} {value!r}"
    if declared.startswith("int") and not (isinstance(value, int) or float(value).is_integer()):
        return f"must be an integer, got {value!r}"
    return None


def _make_pattern(cls, values: dict, where: str):
    """Build ``cls(**values)``, turning type and validity problems into one message about ``where``."""
    known = {f.name for f in dataclasses.fields(cls)}
    if SPANS_FIELD in values and issubclass(cls, _ModalityPattern):
        raise InvalidArgumentError(f"{where}: field {SPANS_FIELD!r} is not allowed in a config: modality spans describe one "
                         f"input, so they are passed per call (sparse_attn.hf.modality(spans), "
                         f"sparse_attn.patterns.with_modality), never stored with the {NAME_OF[cls]} pattern")
    known -= {SPANS_FIELD} if issubclass(cls, _ModalityPattern) else set()
    reasons = [f"unknown field {k!r} for {NAME_OF[cls]} (fields: {sorted(known)})" for k in values if k not in known]
    for k, v in values.items():
        if k in known:
            why = _field_type_reason(cls, k, v)
            if why:
                reasons.append(f"field {k!r} {why}")
    if reasons:
        raise InvalidArgumentError(f"{where}: " + "; ".join(reasons))
    declared = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values = {k: int(v) if v is not None and declared[k].startswith("int") else v for k, v in values.items()}
    try:
        return cls(**values)
    except ValueError as e:
        raise InvalidArgumentError(f"{where}: {e}") from None


def _score(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{where}: score must be a finite number, got {value!r}")
    return float(value)


def _raise_all(reasons: list[str], schema: str):
    if reasons:
        extra = f" (and {len(reasons) - _MAX_REASONS} more)" if len(reasons) > _MAX_REASONS else ""
        raise InvalidArgumentError(f"bad sparse config ({schema} schema): " + "; ".join(reasons[:_MAX_REASONS]) + extra)


# ---------------------------------------------------------------------------------------------------- our schema
def _pattern_json(p: Pattern) -> dict:
    """A head's object; a modality pattern's ``modality`` is always None in a config, so it is not written."""
    fields = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    if isinstance(p, _ModalityPattern):
        fields.pop(SPANS_FIELD)
    return {"pattern": NAME_OF[type(p)], **fields}


def pattern_to_json(pattern: Pattern) -> dict:
    """One head's object of our schema (``{"pattern": name, field: value, ...}``) for ``pattern``."""
    return _pattern_json(pattern)


def pattern_from_json(obj, where: str = "pattern") -> Pattern:
    """The pattern of one head's object of our schema; ValueError naming ``where`` and the field when it is bad."""
    if isinstance(obj, dict) and "score" in obj:
        raise InvalidArgumentError(f"{where}: a pattern object has no 'score'")
    return _head_from_ours(obj, where)[0]


def _to_ours(cfg: SparseConfig) -> dict:
    layers = []
    for i, heads in enumerate(cfg.layers):
        if heads is None:
            layers.append("dense")
            continue
        row = []
        for h, p in enumerate(heads):
            entry = _pattern_json(p)
            if cfg.scores is not None and cfg.scores[i] is not None:
                entry["score"] = float(cfg.scores[i][h])
            row.append(entry)
        layers.append(row)
    return {"format": FORMAT, "version": VERSION, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "reference_length": cfg.reference_length, "metadata": dict(cfg.metadata), "layers": layers}


def _from_ours(obj: dict) -> SparseConfig:
    if obj.get("format") != FORMAT:
        hint = " (a MInference config is a list of layers, not an object)" if "format" not in obj else ""
        raise InvalidArgumentError(f"bad sparse config: 'format' must be {FORMAT!r}, got {obj.get('format')!r}{hint}")
    if obj.get("version") != VERSION:
        raise InvalidArgumentError(f"bad sparse config: unsupported 'version' {obj.get('version')!r} (this reader knows "
                         f"version {VERSION})")
    allowed = {"format", "version", "num_layers", "num_heads", "reference_length", "metadata", "layers"}
    reasons = [f"unknown top-level key {k!r}" for k in obj if k not in allowed]
    reasons += [f"missing top-level key {k!r}" for k in ("num_layers", "num_heads", "layers") if k not in obj]
    _raise_all(reasons, "sparse_attn")
    n_layers, n_heads, raw = obj["num_layers"], obj["num_heads"], obj["layers"]
    ref = obj.get("reference_length")
    for name, value in (("num_layers", n_layers), ("num_heads", n_heads)):
        if not _is_count(value):
            reasons.append(f"{name} must be a positive int, got {value!r}")
    if ref is not None and not _is_count(ref):
        reasons.append(f"reference_length must be a positive int or null, got {ref!r}")
    if not isinstance(raw, list):
        reasons.append(f"'layers' must be a list, got {type(raw).__name__}")
    if not isinstance(obj.get("metadata", {}), dict):
        reasons.append("'metadata' must be an object")
    _raise_all(reasons, "sparse_attn")
    if len(raw) != n_layers:
        reasons.append(f"'layers' has {len(raw)} entries, num_layers is {n_layers}")
    layers, scores = [], []
    for i, entry in enumerate(raw):
        if entry is None or entry == "dense":
            layers.append(None)
            scores.append(None)
            continue
        if isinstance(entry, dict):
            mixed = " (a MInference layer {head: [type, v, s, score]}: mixed schemas)" if _looks_minference(entry) \
                else ""
            reasons.append(f"layer {i}: must be \"dense\" or a list of {n_heads} head objects, got an object{mixed}")
            layers.append(None)
            scores.append(None)
            continue
        if not isinstance(entry, list):
            reasons.append(f"layer {i}: must be \"dense\" or a list of {n_heads} head objects, got {entry!r}")
            layers.append(None)
            scores.append(None)
            continue
        if len(entry) != n_heads:
            reasons.append(f"layer {i}: has {len(entry)} heads, num_heads is {n_heads}")
        heads, row = [], []
        for h, head in enumerate(entry):
            where = f"layer {i}, head {h}"
            try:
                p, s = _head_from_ours(head, where)
                heads.append(p)
                row.append(s)
            except ValueError as e:
                reasons.append(str(e))
        layers.append(heads)
        scores.append(row if any(s is not None for s in row) else None)
    _raise_all(reasons, "sparse_attn")
    if any(row is not None for row in scores):
        scores = [None if row is None else [0.0 if s is None else s for s in row] for row in scores]
    else:
        scores = None
    return SparseConfig(n_layers, n_heads, layers, reference_length=ref, scores=scores,
                        metadata=dict(obj.get("metadata") or {}))


def _head_from_ours(head, where: str):
    if isinstance(head, list):
        raise InvalidArgumentError(f"{where}: must be an object {{\"pattern\": name, ...}}, got a list {head!r}"
                         f"{' (a MInference entry: mixed schemas)' if _looks_minference_head(head) else ''}")
    if not isinstance(head, dict):
        raise InvalidArgumentError(f"{where}: must be an object {{\"pattern\": name, ...}}, got {head!r}")
    values = dict(head)
    name = values.pop("pattern", None)
    if name not in PATTERN_NAMES:
        raise InvalidArgumentError(f"{where}: unknown pattern {name!r} (known: {sorted(PATTERN_NAMES)})")
    score = values.pop("score", None)
    if score is not None:
        score = _score(score, where)
    return _make_pattern(PATTERN_NAMES[name], values, where), score


def _looks_minference(entry: dict) -> bool:
    return bool(entry) and all(str(k).isdigit() for k in entry)


def _looks_minference_head(entry) -> bool:
    return isinstance(entry, list) and bool(entry) and entry[0] in MINFERENCE_TYPES


# ---------------------------------------------------------------------------------------------------- MInference
def _to_minference(cfg: SparseConfig) -> list:
    dropped = set()
    if cfg.reference_length is not None:
        dropped.add("reference_length")
    out = []
    for i, heads in enumerate(cfg.layers):
        heads = heads if heads is not None else [Dense()] * cfg.num_heads
        layer = {}
        for h, p in enumerate(heads):
            score = 0.0 if cfg.scores is None or cfg.scores[i] is None else float(cfg.scores[i][h])
            try:
                entry, lost = _minference_entry(p)
            except ValueError as e:
                raise InvalidArgumentError(f"layer {i}, head {h}: {e}") from None
            dropped |= lost
            layer[str(h)] = entry + [score]
        out.append(layer)
    if dropped:
        warnings.warn(f"the MInference schema cannot express {sorted(dropped)}; they are not written",
                      stacklevel=3)
    return out


def _minference_entry(p: Pattern):
    """``[type, vertical, slash]`` of a pattern, and the names of the non-default settings it loses."""
    defaults = type(p)()
    if isinstance(p, VerticalSlash):
        lost = {n for n in ("gamma", "last_q", "min_vertical", "min_slash") if getattr(p, n) != getattr(defaults, n)}
        if p.sink != min(64, p.vertical) or p.local != min(64, p.slash):
            lost.add("vertical_slash sink/local")
        return ["vertical_and_slash", p.vertical, p.slash], lost
    if isinstance(p, AShape):
        return ["stream_llm", p.sink, p.local], set()
    if isinstance(p, BlockSparse):
        return ["block_sparse", p.top_k if p.top_k is not None else 100, 0], ({"gamma"} if p.gamma else set())
    if isinstance(p, Dense):
        return ["dense", 0, 0], set()
    if isinstance(p, _ModalityPattern):
        raise InvalidArgumentError(f"the MInference schema has no type for the modality pattern {NAME_OF[type(p)]!r} "
                         f"({type(p).__name__}); save this config with format='sparse_attn'")
    raise InvalidArgumentError(f"the MInference schema has no type for {type(p).__name__}")


def _from_minference(obj: list) -> SparseConfig:
    if not obj:
        raise InvalidArgumentError("bad sparse config (MInference schema): the list of layers is empty")
    reasons, layers, scores, n_heads = [], [], [], None
    for i, layer in enumerate(obj):
        if not isinstance(layer, dict):
            mixed = " (sparse_attn head objects need the sparse_attn schema: mixed schemas)" \
                if isinstance(layer, list) and layer and isinstance(layer[0], dict) and "pattern" in layer[0] else ""
            reasons.append(f"layer {i}: must be an object {{\"<head>\": [type, vertical, slash, score]}}, got "
                           f"{type(layer).__name__}{mixed}")
            continue
        bad_keys = [k for k in layer if not str(k).isdigit()]
        if bad_keys:
            reasons.append(f"layer {i}: head keys must be head numbers \"0\", \"1\", ..., got {bad_keys[:5]}")
            continue
        heads = sorted(int(k) for k in layer)
        if n_heads is None:
            n_heads = len(heads)
        if heads != list(range(len(heads))):
            reasons.append(f"layer {i}: heads must be numbered 0..{len(heads) - 1} without gaps, got {heads}")
            continue
        if len(heads) != n_heads:
            reasons.append(f"layer {i}: has {len(heads)} heads, layer 0 has {n_heads}")
            continue
        row, row_scores = [], []
        for h in heads:
            entry = layer[str(h)] if str(h) in layer else layer[h]
            try:
                p, s = _head_from_minference(entry, f"layer {i}, head {h}")
                row.append(p)
                row_scores.append(s)
            except ValueError as e:
                reasons.append(str(e))
        layers.append(row)
        scores.append(row_scores)
    _raise_all(reasons, "MInference")
    return SparseConfig(len(layers), n_heads, layers, scores=scores)


def _head_from_minference(entry, where: str):
    if isinstance(entry, dict):
        raise InvalidArgumentError(f"{where}: must be a list [type, vertical, slash, score], got an object"
                         f"{' (a sparse_attn head object: mixed schemas)' if 'pattern' in entry else ''}")
    if not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4):
        raise InvalidArgumentError(f"{where}: must be a list [type, vertical, slash, score], got {entry!r}")
    kind, vertical, slash = entry[:3]
    score = _score(entry[3], where) if len(entry) == 4 else 0.0
    if kind not in MINFERENCE_TYPES:
        raise InvalidArgumentError(f"{where}: unknown type {kind!r} (known: {sorted(MINFERENCE_TYPES)})")
    for name, value in (("vertical", vertical), ("slash", slash)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise InvalidArgumentError(f"{where}: {name} must be an integer, got {value!r}")
        if value < 0:
            raise InvalidArgumentError(f"{where}: {name} must be >= 0, got {value!r}")
    vertical, slash = int(vertical), int(slash)
    cls = MINFERENCE_TYPES[kind]
    if cls is VerticalSlash:
        values = {"vertical": vertical, "slash": slash, "sink": min(64, vertical), "local": min(64, slash)}
    elif cls is AShape:
        values = {"sink": vertical, "local": slash}
    elif cls is BlockSparse:
        values = {"top_k": vertical if vertical > 0 else 100}
    else:
        values = {}
    return _make_pattern(cls, values, where), score
