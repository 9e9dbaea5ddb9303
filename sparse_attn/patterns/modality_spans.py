"""Where the text, image and video tokens of a mixed sequence lie: the input description of the modality patterns.

Positions are key positions ``0 .. k_len - 1`` of one sequence (the queries are the last ``q_len`` of them).  Tokens
no span covers are text.  A video span may name its frame size (``frame_tokens``, tokens per frame), which must
divide its length; `Grid` then uses it as its stride.

The description is small host metadata (tuples of ints), hashable, so a frozen pattern can carry it and `estimate`
can group heads by it.  Helpers derive it from common processor outputs: token type ids (``mm_token_type_ids``,
0 text / 1 image / 2 video) and Qwen2-VL style ``image_grid_thw`` / ``video_grid_thw`` with a spatial merge size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from ..errors import InvalidArgumentError, InvalidTypeError

KINDS = ("text", "image", "video")
#: kind -> id in `ModalitySpans.kind_ids` (and the default meaning of token type ids)
KIND_ID = {kind: i for i, kind in enumerate(KINDS)}


@dataclass(frozen=True)
class ModalitySpan:
    """Tokens ``[start, end)`` of one ``kind`` ("text", "image" or "video"); ``frame_tokens``: tokens per frame of a
    video (None: unknown)."""

    start: int
    end: int
    kind: str
    frame_tokens: int | None = None

    def __post_init__(self):
        reasons = []
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                reasons.append(f"{name} must be an int >= 0, got {value!r}")
        if self.kind not in KINDS:
            reasons.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not reasons and self.end <= self.start:
            reasons.append(f"end ({self.end}) must be > start ({self.start})")
        f = self.frame_tokens
        if f is not None:
            if self.kind != "video":
                reasons.append(f"frame_tokens is only for video spans, got it on a {self.kind!r} span")
            elif not isinstance(f, int) or isinstance(f, bool) or f < 1:
                reasons.append(f"frame_tokens must be a positive int, got {f!r}")
            elif not reasons and (self.end - self.start) % f:
                reasons.append(f"frame_tokens ({f}) must divide the span length ({self.end - self.start})")
        if reasons:
            raise InvalidArgumentError(f"invalid modality span ({self.start}, {self.end}, {self.kind!r}): " + "; ".join(reasons))

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ModalitySpans:
    """Non-overlapping spans sorted by start, and optionally the sequence length they describe (checked against
    ``k_len`` when estimating).  Build with `ModalitySpans.of`, `from_token_types` or `from_grid_thw`."""

    spans: tuple = ()
    length: int | None = None

    def __post_init__(self):
        if not isinstance(self.spans, tuple) or not all(isinstance(s, ModalitySpan) for s in self.spans):
            raise InvalidTypeError("spans must be a tuple of ModalitySpan (build with ModalitySpans.of([...]))")
        if self.length is not None and (not isinstance(self.length, int) or isinstance(self.length, bool)
                                        or self.length < 1):
            raise InvalidArgumentError(f"length must be a positive int or None, got {self.length!r}")
        reasons = []
        for a, b in zip(self.spans, self.spans[1:]):
            if b.start < a.start:
                reasons.append(f"spans must be sorted by start: ({a.start}, {a.end}) comes before ({b.start}, {b.end})")
            elif b.start < a.end:
                reasons.append(f"spans overlap: ({a.start}, {a.end}, {a.kind!r}) and ({b.start}, {b.end}, {b.kind!r})")
        if self.length is not None:
            reasons += [f"span ({s.start}, {s.end}, {s.kind!r}) ends past the sequence length {self.length}"
                        for s in self.spans if s.end > self.length]
        if reasons:
            raise InvalidArgumentError("invalid modality spans: " + "; ".join(reasons))

    @classmethod
    def of(cls, spans, length: int | None = None) -> "ModalitySpans":
        """From ``[(start, end, kind)]`` or ``[(start, end, "video", frame_tokens)]`` entries (or ModalitySpan),
        in any order: they are sorted, then checked for overlaps and against ``length``."""
        if isinstance(spans, ModalitySpans):
            return spans if length is None else cls(spans.spans, length)
        if isinstance(spans, (str, bytes)) or not hasattr(spans, "__iter__"):
            raise InvalidTypeError(f"spans must be a list of (start, end, kind[, frame_tokens]) tuples, got "
                            f"{type(spans).__name__}")
        items = []
        for entry in spans:
            if isinstance(entry, ModalitySpan):
                items.append(entry)
            elif isinstance(entry, (tuple, list)) and len(entry) in (3, 4):
                items.append(ModalitySpan(*entry))
            else:
                raise InvalidTypeError(f"spans: each entry must be (start, end, kind) or (start, end, 'video', "
                                f"frame_tokens), got {entry!r}")
        return cls(tuple(sorted(items, key=lambda s: (s.start, s.end))), length)

    # ------------------------------------------------------------------ views
    def check_length(self, k_len: int) -> None:
        """Raise ValueError unless the spans fit a sequence of ``k_len`` keys (and match ``length`` if set)."""
        if self.length is not None and self.length != k_len:
            raise InvalidArgumentError(f"modality spans describe a sequence of length {self.length}, but k has {k_len} keys")
        past = [s for s in self.spans if s.end > k_len]
        if past:
            raise InvalidArgumentError(f"modality span ({past[0].start}, {past[0].end}, {past[0].kind!r}) ends past the "
                             f"sequence (k has {k_len} keys)")

    def kind_ids(self, k_len: int, device=None) -> torch.Tensor:
        """Long ``[k_len]``: the kind id (`KIND_ID`) of every key position; uncovered positions are text."""
        self.check_length(k_len)
        ids = torch.zeros(k_len, dtype=torch.long)
        for s in self.spans:
            ids[s.start:s.end] = KIND_ID[s.kind]
        return ids.to(device)

    def intervals(self, kind: str, k_len: int) -> list[tuple[int, int]]:
        """Sorted disjoint ``[start, end)`` intervals of ``kind`` within ``[0, k_len)`` (text: also the gaps),
        adjacent intervals merged."""
        ids = self.kind_ids(k_len)
        inside = (ids == KIND_ID[kind]).to(torch.int8)
        edges = torch.diff(torch.nn.functional.pad(inside, (1, 1))).nonzero().flatten().tolist()
        return list(zip(edges[0::2], edges[1::2]))

    def of_kind(self, kind: str) -> tuple:
        return tuple(s for s in self.spans if s.kind == kind)

    # ------------------------------------------------------------------ from processor outputs
    @classmethod
    def from_token_types(cls, token_type_ids, *, kinds=None, frame_tokens=None) -> "ModalitySpans":
        """From token type ids ``[L]`` (or ``[1, L]``): runs of equal ids become spans.  ``kinds`` maps an id to a
        kind (default 0 text, 1 image, 2 video, as ``mm_token_type_ids``).  ``frame_tokens``: one int for every
        video run, or a list with one per video run (or None).  Adjacent runs of one kind merge into one span,
        so separate back-to-back images need `from_grid_thw` or explicit spans."""
        ids = torch.as_tensor(token_type_ids)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.numel() == 0:
            raise InvalidArgumentError(f"token_type_ids must be a non-empty 1-d int tensor [L] (or [1, L]; one sequence at a "
                             f"time), got shape {tuple(ids.shape)} and dtype {ids.dtype}")
        kinds = dict(enumerate(KINDS)) if kinds is None else dict(kinds)
        unknown = sorted(set(ids.unique().tolist()) - set(kinds))
        if unknown:
            raise InvalidArgumentError(f"token_type_ids: ids {unknown} have no kind; kinds maps {sorted(kinds)}")
        bad = {i: k for i, k in kinds.items() if k not in KINDS}
        if bad:
            raise InvalidArgumentError(f"kinds: values must be one of {KINDS}, got {bad}")
        change = (torch.diff(ids) != 0).nonzero().flatten() + 1
        starts = [0] + change.tolist()
        ends = change.tolist() + [ids.numel()]
        runs = [(s, e, kinds[int(ids[s])]) for s, e in zip(starts, ends)]
        merged = []
        for s, e, kind in runs:
            if merged and merged[-1][2] == kind:
                merged[-1] = (merged[-1][0], e, kind)
            else:
                merged.append((s, e, kind))
        videos = [r for r in merged if r[2] == "video"]
        frames = _per_video(frame_tokens, len(videos))
        out, v = [], 0
        for s, e, kind in merged:
            if kind == "text":
                continue
            if kind == "video":
                out.append(ModalitySpan(s, e, kind, frames[v]))
                v += 1
            else:
                out.append(ModalitySpan(s, e, kind))
        return cls(tuple(out), ids.numel())

    @classmethod
    def from_grid_thw(cls, input_ids, *, image_token_id=None, video_token_id=None, image_grid_thw=None,
                      video_grid_thw=None, spatial_merge_size: int = 2) -> "ModalitySpans":
        """From Qwen2-VL style processor outputs of one sequence: ``input_ids [L]`` (or ``[1, L]``), the
        placeholder token ids, and ``image_grid_thw`` / ``video_grid_thw`` ``[n, 3]`` (t, h, w in patches).  Each
        image takes ``t*h*w / merge^2`` placeholder tokens, each video frame (temporal patch) ``h*w / merge^2``.
        The i-th image (video) takes the next block of image (video) placeholders, which must be contiguous: so
        back-to-back images become separate spans."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise InvalidArgumentError(f"input_ids must be 1-d [L] (or [1, L]; one sequence at a time), got {tuple(ids.shape)}")
        if not isinstance(spatial_merge_size, int) or spatial_merge_size < 1:
            raise InvalidArgumentError(f"spatial_merge_size must be a positive int, got {spatial_merge_size!r}")
        spans = []
        for kind, token_id, grid in (("image", image_token_id, image_grid_thw), ("video", video_token_id,
                                                                                 video_grid_thw)):
            if grid is None:
                continue
            if token_id is None:
                raise InvalidArgumentError(f"{kind}_grid_thw given without {kind}_token_id")
            grid = torch.as_tensor(grid).reshape(-1, 3).tolist() if torch.as_tensor(grid).numel() else []
            where = (ids == token_id).nonzero().flatten().tolist()
            merge = spatial_merge_size ** 2
            sizes = []
            for t, h, w in grid:
                if (h * w) % merge:
                    raise InvalidArgumentError(f"{kind}_grid_thw entry {(t, h, w)}: h*w must be divisible by "
                                     f"spatial_merge_size^2 ({merge})")
                sizes.append((t * h * w // merge, h * w // merge))
            if sum(n for n, _ in sizes) != len(where):
                raise InvalidArgumentError(f"{kind}_grid_thw asks for {sum(n for n, _ in sizes)} {kind} tokens, input_ids has "
                                 f"{len(where)} tokens with id {token_id}")
            used = 0
            for n, per_frame in sizes:
                start, end = where[used], where[used + n - 1] + 1
                if end - start != n:
                    raise InvalidArgumentError(f"{kind} {len(spans)}: its {n} placeholder tokens are not contiguous in "
                                     f"input_ids (from {start} to {end - 1})")
                spans.append(ModalitySpan(start, end, kind, per_frame if kind == "video" else None))
                used += n
        return cls.of(spans, ids.numel())


def _per_video(frame_tokens, n_videos: int) -> list:
    if frame_tokens is None or isinstance(frame_tokens, int):
        return [frame_tokens] * n_videos
    frames = list(frame_tokens)
    if len(frames) != n_videos:
        raise InvalidArgumentError(f"frame_tokens: got {len(frames)} values for {n_videos} video spans")
    return frames


def as_modality(value, batch: int | None = None):
    """Normalise a pattern's ``modality`` argument: None, one `ModalitySpans` (or a list of span tuples) for every
    batch row, or a tuple of one per batch row.  Returns None, a ModalitySpans, or a tuple of them."""
    if value is None or isinstance(value, ModalitySpans):
        return value
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, ModalitySpans) for v in value):
        if batch is not None and len(value) != batch:
            raise InvalidArgumentError(f"modality: a per-row tuple needs one ModalitySpans per batch row ({batch}), got "
                             f"{len(value)}")
        return tuple(value)
    return ModalitySpans.of(value)
