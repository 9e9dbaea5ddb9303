"""What a patched model remembers (`PatchState`), shared by `patch` and the attention function."""
from __future__ import annotations

from dataclasses import dataclass

from ... import prefill
from ...backends import BACKEND_NAMES
from ...config import empty_budget_reason
from ...patterns import Pattern
from ...errors import InvalidArgumentError, InvalidTypeError
from .custom_ops import register_state

#: patch(**options) defaults; `pattern` is the online pattern of every head when no config is given.
DEFAULT_OPTIONS = {"dense_below": None, "dense_above": None, "backend": "auto", "pattern": None,
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

    def __post_init__(self):
        # The int naming this state in the custom op's calls, assigned eagerly: under torch.compile the attention
        # function then reads a plain int attribute (torch 2.11's Dynamo cannot pass this object to a constant
        # function at trace time).
        self.op_handle = register_state(self)

    def patterns(self, layer_idx, seq_len: int):
        """One pattern per query head of layer ``layer_idx`` for ``seq_len`` keys, or None to run it dense."""
        if self.config is None:
            return [self.options["pattern"] or prefill.DEFAULT_PATTERN] * self.num_heads
        if layer_idx is None:
            return None
        return self.config.patterns_for_layer(layer_idx, seq_len)


def check_options(options: dict, *, has_config: bool) -> dict:
    """``options`` checked and completed with the defaults (``dense_above``: `ONLINE_DENSE_ABOVE` without a config,
    1.0 with one); TypeError / ValueError naming each bad option."""
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise InvalidTypeError(f"patch: unknown options {unknown}; expected some of {sorted(DEFAULT_OPTIONS)}")
    opts = {**DEFAULT_OPTIONS, **options}
    reasons = []
    below = opts["dense_below"]
    if below is not None and (not isinstance(below, int) or isinstance(below, bool) or below < 0):
        reasons.append(f"dense_below must be an int >= 0, or None (the device's default), got {below!r}")
    above = opts["dense_above"]
    if above is not None and (not isinstance(above, (int, float)) or isinstance(above, bool) or not 0 < above <= 1):
        reasons.append(f"dense_above must be a number in (0, 1], or None, got {above!r}")
    if opts["backend"] not in BACKEND_NAMES:
        reasons.append(f"backend must be one of {BACKEND_NAMES}, got {opts['backend']!r}")
    if opts["pattern"] is not None and not isinstance(opts["pattern"], Pattern):
        reasons.append(f"pattern must be a Pattern (AShape, VerticalSlash, BlockSparse, Dense) or None, "
                       f"got {type(opts['pattern']).__name__}")
    elif opts["pattern"] is not None and empty_budget_reason(opts["pattern"]):
        reasons.append(f"pattern: {empty_budget_reason(opts['pattern'])}")
    if opts["on_layout"] is not None and not callable(opts["on_layout"]):
        reasons.append(f"on_layout must be callable(layer_idx, layout, density) or None, "
                       f"got {type(opts['on_layout']).__name__}")
    if reasons:
        raise InvalidArgumentError("patch: " + "; ".join(reasons))
    if opts["dense_above"] is None:
        opts["dense_above"] = ONLINE_DENSE_ABOVE if not has_config else 1.0
    return opts
