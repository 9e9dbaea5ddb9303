"""Modality-aware patterns for mixed text / image / video sequences (MMInference-style heads).

* `QBoundary`: a separate vertical-slash estimate per query modality, from the last ``last_q`` query rows of that
  modality, applied to the query blocks holding rows of that modality.
* `TwoDBoundary`: a separate estimate per (query modality, key modality) pair: its columns are keys of the key
  modality, its diagonals are cut to the key modality's spans.
* `Grid`: video rows attend to the same phase modulo the frame stride in earlier frames of their video (diagonals
  at multiples of the stride, +- ``width``), plus sinks, a local band and ``vertical`` columns; the stride comes
  from the video span's ``frame_tokens``, else ``stride``, else it is detected per head from the query sample.
  Rows of other modalities get a `QBoundary` estimate.

Every pattern carries the spans of the call in ``modality`` (a `ModalitySpans`, a list of ``(start, end, kind)``
tuples, or a tuple of one `ModalitySpans` per batch row); ``pattern.with_modality(spans)`` gives a copy for a new
call.  Without spans, QBoundary / TwoDBoundary see text only and Grid sees one video.

``consistent_columns`` (default True): columns are ranked by `consistent_column_mass` (mass in both halves of the
sample) instead of plain column mass, so grid diagonals crossing the sample are not taken for columns; with False,
text-only QBoundary / TwoDBoundary give exactly the `VerticalSlash` layout.  A query
block that straddles a boundary gets the union of its modalities' keys.  The budgets (``vertical``, ``slash``,
``gamma``, ``min_*``, ``sink``, ``local``, ``last_q``) mean what they mean in `VerticalSlash`, per part.

All heads of a group are estimated at once; loops run over modalities, spans and (for per-row spans) batch rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..layout import ceil_div, kept_first
from ..estimators.frame_period import detect_period
from ..estimators.row_sample import consistent_column_mass, rows_probs
from ..estimators.sample_mass import column_mass, diagonal_mass
from .base import per_head
from .modality_parts import Part, compile_parts, concat_batch
from .modality_spans import KIND_ID, KINDS, ModalitySpan, ModalitySpans, as_modality
from .vertical_slash import VerticalSlashBudgets, _select
from ..errors import InvalidArgumentError

@dataclass(frozen=True)
class _ModalityPattern(VerticalSlashBudgets):
    modality: object = None
    consistent_columns: bool = True

    def invalid_reasons(self):
        reasons = super().invalid_reasons()
        try:
            object.__setattr__(self, "modality", as_modality(self.modality))
        except (ValueError, TypeError) as e:
            reasons.append(f"modality: {e}")
        return reasons

    def with_modality(self, modality):
        """A copy of this pattern for a call whose sequence has these spans (see the module docstring)."""
        return dataclasses.replace(self, modality=modality)

    def group_key(self):
        return (type(self), self.last_q, self.modality, self.consistent_columns)

    @classmethod
    def build(cls, patterns, heads, q, k, *, causal, scale, block_m, block_n):
        modality = patterns[0].modality
        if isinstance(modality, tuple):                                   # one description per batch row
            if len(modality) != q.shape[0]:
                raise InvalidArgumentError(f"modality: got {len(modality)} per-row span descriptions for batch {q.shape[0]}")
            return concat_batch([cls._build_rows(patterns, heads, q[b:b + 1], k[b:b + 1], modality[b], causal,
                                                 scale, block_m, block_n) for b in range(q.shape[0])])
        return cls._build_rows(patterns, heads, q, k, modality, causal, scale, block_m, block_n)

    @classmethod
    def _build_rows(cls, patterns, heads, q, k, spans, causal, scale, block_m, block_n):
        ctx = _Context(patterns, heads, q, k, spans, causal, scale, block_m, block_n)
        parts = cls._parts(ctx)
        return compile_parts(parts, q.shape[0], heads.shape[0], q_len=ctx.q_len, k_len=ctx.k_len, block_m=block_m,
                             block_n=block_n, causal=causal, device=q.device)

    @classmethod
    def _parts(cls, ctx) -> list:
        raise NotImplementedError


@dataclass(frozen=True)
class QBoundary(_ModalityPattern):
    """Vertical-slash per query modality, estimated from that modality's own last ``last_q`` query rows."""

    @classmethod
    def _parts(cls, ctx):
        return [ctx.vs_part(kind) for kind in ctx.row_kinds()]


@dataclass(frozen=True)
class TwoDBoundary(_ModalityPattern):
    """Vertical-slash per (query modality, key modality) pair.  With ``gamma`` each pair keeps that share of its
    own mass in the sample, so a pair with little mass gets few keys."""

    @classmethod
    def _parts(cls, ctx):
        parts = []
        for q_kind in ctx.row_kinds():
            probs, pos = ctx.sample(ctx.rows_of(q_kind))
            visible = ctx.kind_of_key[:int(pos.max()) + 1] if ctx.causal else ctx.kind_of_key
            for k_kind in sorted(set(visible.tolist())):
                in_kind = (ctx.kind_of_key == k_kind).to(ctx.device)
                pair = probs * in_kind
                share = pair.sum((-1, -2)) / pair.shape[-2]                     # [B, h] of the sample's mass
                pair = pair / share.clamp(min=1e-30)[..., None, None]           # gamma: share of the pair's mass
                v, v_ok, lo, hi, s_ok = ctx.select(pair, pos, ctx.vs_params())
                has = share > 0
                v_ok = v_ok & in_kind[v] & has[..., None]
                parts.append(Part(ctx.blocks_of(q_kind), v, v_ok, lo, hi, s_ok & has[..., None],
                                  clip=ctx.spans.intervals(KINDS[k_kind], ctx.k_len)))
        return parts


@dataclass(frozen=True)
class Grid(_ModalityPattern):
    """Grid attention on video rows; other rows get a `QBoundary` estimate with the vertical-slash budgets.

    * ``stride``: tokens per frame when the spans do not name it (None: detect per head from the sample's
      diagonal mass, between ``min_stride`` and the video length; a head with no clear period gets no grid).
    * ``width``: the grid diagonals cover distances ``j * stride +- width`` (neighbouring spatial positions).
    * ``frames``: keep only the ``frames`` most recent frames (None: all earlier frames of the video).
    * video rows also keep the first ``sink`` keys, the ``local`` nearest and ``vertical`` top columns of the
      video's sample (a fixed budget: ``gamma`` applies to the other rows only).
    * ``tail_columns``: a grid diagonal band spans ``block_m + 2 width`` keys per query block; list the keys past
      its first ``block_n`` as columns (True) instead of a second, mostly wasted tile (False).
    """

    stride: int | None = None
    width: int = 8
    frames: int | None = None
    min_stride: int = 16
    tail_columns: bool = True

    def invalid_reasons(self):
        reasons = super().invalid_reasons()
        if self.stride is not None and (not isinstance(self.stride, int) or self.stride < 1):
            reasons.append(f"stride must be a positive int or None, got {self.stride!r}")
        if self.frames is not None and (not isinstance(self.frames, int) or self.frames < 1):
            reasons.append(f"frames must be a positive int or None, got {self.frames!r}")
        if self.min_stride < 1:
            reasons.append(f"min_stride must be >= 1, got {self.min_stride}")
        return reasons

    def group_key(self):
        return super().group_key() + (self.stride, self.width, self.frames, self.min_stride, self.tail_columns)

    @classmethod
    def _parts(cls, ctx):
        pattern = ctx.patterns[0]
        videos = ctx.spans.of_kind("video") if ctx.has_spans else (ModalitySpan(0, ctx.k_len, "video"),)
        parts = [ctx.vs_part(kind) for kind in ctx.row_kinds() if KINDS[kind] != "video"]
        for video in videos:
            rows = ctx.rows_in(video.start, video.end)
            if rows.shape[0] == 0:
                continue
            probs, pos = ctx.sample(rows[-pattern.last_q:])
            # Sinks, local band and top columns: a vertical-slash selection whose slash budget is the local band.
            prm = ctx.vs_params()
            prm["slash"] = (prm["local"] + ctx.block_n - 1) // ctx.block_n
            prm["min_slash"] = torch.zeros_like(prm["slash"])
            prm["gamma"] = torch.full_like(prm["gamma"], 2.0)
            v, v_ok, lo, hi, s_ok = ctx.select(probs, pos, prm)
            blocks = ctx.blocks_in(video.start, video.end)
            parts.append(Part(blocks, v, v_ok, lo, hi, s_ok))
            stride = cls._stride(ctx, video, probs, pos, pattern)                 # [B, h]
            lo, hi, ok = cls._grid_bands(stride, video.length, pattern)
            parts.append(Part(blocks, band_lo=lo, band_hi=hi, band_ok=ok, clip=[(video.start, video.end)],
                              tail_columns=pattern.tail_columns))
        return parts

    @staticmethod
    def _stride(ctx, video, probs, pos, pattern):
        B, h = probs.shape[:2]
        given = video.frame_tokens or pattern.stride
        if given:
            return torch.full((B, h), given, dtype=torch.long, device=ctx.device)
        diag = diagonal_mass(probs[..., video.start:video.end], pos - video.start, video.length)
        return detect_period(diag, pattern.min_stride, video.length - 1, window=max(pattern.width, 1),
                             min_distance=max(pattern.local, 1))

    @staticmethod
    def _grid_bands(stride, length, pattern):
        """Distance bands ``j * stride +- width`` for j = 1 .. (frames or the video's frames): [B, h, J] each."""
        positive = stride[stride > 0]
        n = int((length - 1 + pattern.width) // positive.min()) if positive.numel() else 0
        n = min(n, pattern.frames) if pattern.frames else n
        j = torch.arange(1, n + 1, device=stride.device)
        d = stride[..., None] * j
        ok = (stride[..., None] > 0) & (d - pattern.width < length)
        return (d - pattern.width).clamp(min=0), d + pattern.width, ok


class _Context:
    """What every part needs for one set of spans: positions and kinds of rows and keys, block membership, the
    query sample's probabilities, the per-head budgets."""

    def __init__(self, patterns, heads, q, k, spans, causal, scale, block_m, block_n):
        self.patterns, self.heads, self.q, self.k = patterns, heads, q, k
        self.causal, self.scale, self.block_m, self.block_n = causal, scale, block_m, block_n
        self.q_len, self.k_len, self.device = q.shape[2], k.shape[2], q.device
        self.has_spans = spans is not None
        self.spans = spans if spans is not None else ModalitySpans()
        self.kind_of_key = self.spans.kind_ids(self.k_len)                         # CPU long [Lk]
        self.row_pos = torch.arange(self.q_len) + (self.k_len - self.q_len)        # CPU long [Lq]
        self.kind_of_row = self.kind_of_key[self.row_pos]

    def row_kinds(self) -> list[int]:
        return sorted(set(self.kind_of_row.tolist()))

    def rows_of(self, kind: int) -> torch.Tensor:
        """The last ``last_q`` query rows of this kind (row indices, ascending)."""
        return (self.kind_of_row == kind).nonzero().flatten()[-self.patterns[0].last_q:]

    def rows_in(self, start: int, end: int) -> torch.Tensor:
        return ((self.row_pos >= start) & (self.row_pos < end)).nonzero().flatten()

    def _blocks(self, rows_mask: torch.Tensor) -> torch.Tensor:
        n_qb = ceil_div(self.q_len, self.block_m)
        padded = torch.nn.functional.pad(rows_mask, (0, n_qb * self.block_m - self.q_len))
        return padded.reshape(n_qb, self.block_m).any(-1)

    def blocks_of(self, kind: int) -> torch.Tensor:
        return self._blocks(self.kind_of_row == kind)

    def blocks_in(self, start: int, end: int) -> torch.Tensor:
        return self._blocks((self.row_pos >= start) & (self.row_pos < end))

    def sample(self, rows: torch.Tensor):
        """Probabilities ``[B, h, n, Lk]`` of the group's heads for these query rows, and their positions."""
        probs, pos = rows_probs(self.q, self.k, rows.to(self.device), self.scale, self.causal)
        if self.heads.shape[0] != self.q.shape[1]:
            probs = probs.index_select(1, self.heads)
        return probs, pos

    def vs_params(self) -> dict:
        dev, bn, patterns = self.device, self.block_n, self.patterns
        prm = {name: per_head(patterns, name, dev) for name in ("sink", "local", "vertical", "min_vertical")}
        prm["slash"] = (per_head(patterns, "slash", dev) + bn - 1) // bn                  # in diagonal groups
        prm["min_slash"] = (per_head(patterns, "min_slash", dev) + bn - 1) // bn
        prm["gamma"] = torch.tensor([2.0 if p.gamma is None else p.gamma for p in patterns], device=dev)
        return prm

    def select(self, probs, pos, prm):
        """Vertical-slash selection on a sample: columns [B, h, V] + kept, diagonal groups as distance bands
        (lo, hi [B, h, S]) + kept."""
        n_groups = ceil_div(self.k_len, self.block_n)
        width_v = max(1, min(int(prm["vertical"].max()), self.k_len))
        width_s = max(1, min(int(prm["slash"].max()), n_groups))
        score = consistent_column_mass if self.patterns[0].consistent_columns else column_mass
        verticals, v_ok, groups, s_ok = _select(probs, pos, prm, self.block_n, n_groups, width_v, width_s, score)
        # Keep only as many slots as the fullest head uses (one sync): the per-block index work scales with them.
        v_first = kept_first(v_ok, max(int(v_ok.sum(-1).max()), 1))
        s_first = kept_first(s_ok, max(int(s_ok.sum(-1).max()), 1))
        verticals, v_ok = verticals.gather(-1, v_first), v_ok.gather(-1, v_first)
        groups, s_ok = groups.gather(-1, s_first), s_ok.gather(-1, s_first)
        lo = groups * self.block_n
        return verticals, v_ok, lo, lo + self.block_n - 1, s_ok

    def vs_part(self, kind: int) -> Part:
        probs, pos = self.sample(self.rows_of(kind))
        v, v_ok, lo, hi, s_ok = self.select(probs, pos, self.vs_params())
        return Part(self.blocks_of(kind), v, v_ok, lo, hi, s_ok)


def with_modality(pattern, modality):
    """``pattern`` (or a per-head list) with the modality patterns given these spans; other patterns unchanged."""
    if isinstance(pattern, (list, tuple)):
        return [with_modality(p, modality) for p in pattern]
    return pattern.with_modality(modality) if isinstance(pattern, _ModalityPattern) else pattern


#: Names a per-head config may use for these patterns (MInference-style ``[type, vertical, slash, score]`` entries
#: map ``vertical`` / ``slash`` to the budgets of the same name).
MODALITY_PATTERNS = {"grid": Grid, "q_boundary": QBoundary, "two_d_boundary": TwoDBoundary}

__all__ = ["Grid", "MODALITY_PATTERNS", "QBoundary", "TwoDBoundary", "with_modality", "KIND_ID"]
