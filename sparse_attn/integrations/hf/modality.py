"""Modality spans for the calls of a model patched by `sparse_attn.hf.patch`.

    with sah.modality([(20, 596, "video", 96), (600, 664, "image")]):   # or a ModalitySpans, or one per batch row
        model.generate(ids, ...)

Inside the block, each layer's sparse prefill passes its per-head patterns through
`sparse_attn.patterns.with_modality(patterns, spans)` before `estimate`: `Grid`, `QBoundary` and `TwoDBoundary`
heads get the spans, every other pattern is untouched.  Outside any block the modality patterns of a config see an
all-text call (empty spans): `QBoundary` / `TwoDBoundary` then estimate one vertical-slash per head (from the same
column score) and `Grid` has no video rows, so it does the same; nothing fails.

Positions: the spans index each row's tokens as given to the model, padding excluded (a left-padded row's first real
token is position 0), which is what the row-by-row sparse path of a padded batch sees.  Key positions past the last
span (generated tokens, later text) are text.  A span that ends past the keys of a sparse call (e.g. the first chunk
of a chunked prefill) raises ValueError.  The value lives in a `contextvars.ContextVar`: it is reset when the block
exits, also on an exception; other threads do not see it (asyncio tasks created inside the block inherit it).
"""
from __future__ import annotations

import contextlib
import contextvars

from ...patterns.modality import _ModalityPattern, with_modality
from ...patterns.modality_spans import ModalitySpan, ModalitySpans
from ...errors import InvalidArgumentError, InvalidTypeError

#: The spans of the calls in the current ``modality`` block: None, a ModalitySpans, or a tuple of one per batch row.
_SPANS: contextvars.ContextVar = contextvars.ContextVar("sparse_attn_modality_spans", default=None)
_TEXT_ONLY = ModalitySpans()


@contextlib.contextmanager
def modality(spans):
    """Within the block, the modality patterns of a patched model's layers use ``spans``: a `ModalitySpans`, a list
    of ``(start, end, kind[, frame_tokens])`` tuples (the same for every batch row), or a list with one of those
    per batch row.  Checked on entry (ValueError / TypeError naming ``spans``).  Yields the normalised value."""
    value = normalize_spans(spans)
    token = _SPANS.set(value)
    try:
        yield value
    finally:
        _SPANS.reset(token)


def current_spans():
    """The spans of the innermost active ``modality`` block, or None."""
    return _SPANS.get()


def normalize_spans(spans):
    """A ModalitySpans, or a tuple of one per batch row, from what `modality` accepts."""
    if spans is None:
        raise InvalidTypeError("spans must be a ModalitySpans, a list of (start, end, kind[, frame_tokens]) tuples, or a "
                        "list with one of those per batch row; got None")
    try:
        if _is_per_row(spans):
            return tuple(ModalitySpans.of(row) for row in spans)
        return ModalitySpans.of(spans)
    except (ValueError, TypeError) as e:
        raise type(e)(f"spans: {e}") from None


def _is_per_row(spans) -> bool:
    """A list of rows (each a ModalitySpans or a list of span entries), as opposed to a list of span entries."""
    if isinstance(spans, ModalitySpans) or not isinstance(spans, (list, tuple)) or not spans:
        return False
    return all(isinstance(row, ModalitySpans) or (isinstance(row, (list, tuple)) and
                                                  (not row or isinstance(row[0], (list, tuple, ModalitySpan))))
               for row in spans)


def patterns_for_call(patterns: list, batch: int, k_len: int, row: int | None = None) -> list:
    """``patterns`` (one per query head) for a sparse call over ``k_len`` keys of ``batch`` rows (``row``: the batch
    row of a row-by-row call of a padded batch), with the current spans on the modality patterns; other patterns and
    lists without modality patterns are returned as they are."""
    if not any(isinstance(p, _ModalityPattern) for p in patterns):
        return patterns
    spans = _SPANS.get()
    if spans is None:
        return with_modality(patterns, _TEXT_ONLY)
    if isinstance(spans, tuple):
        rows = len(spans)
        if row is not None:
            if row >= rows:
                raise InvalidArgumentError(f"sparse_attn.hf.modality: spans has {rows} per-row entries, the batch has row {row}")
            spans = spans[row]
        elif rows != batch:
            raise InvalidArgumentError(f"sparse_attn.hf.modality: spans has {rows} per-row entries for a batch of {batch}")
        elif rows == 1:
            spans = spans[0]
    if isinstance(spans, tuple):
        spans = tuple(_fit(s, k_len) for s in spans)
    else:
        spans = _fit(spans, k_len)
    return with_modality(patterns, spans)


def _fit(spans: ModalitySpans, k_len: int) -> ModalitySpans:
    """The spans for a call over ``k_len`` keys: keys past them are text; a span past the keys is an error."""
    past = [s for s in spans.spans if s.end > k_len]
    if past or (spans.length is not None and spans.length > k_len):
        what = f"span {(past[0].start, past[0].end, past[0].kind)}" if past else f"length {spans.length}"
        raise InvalidArgumentError(f"sparse_attn.hf.modality: spans {what} ends past the {k_len} keys of this call; spans "
                         f"index each row's prompt tokens (padding excluded), and chunked prefill with spans past "
                         f"the first chunk is not supported")
    return spans if spans.length is None else ModalitySpans(spans.spans)
