"""What every pattern provides, and the helpers their estimators share."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from ..errors import InvalidArgumentError, InvalidTypeError
from ..layout import SparseLayout, block_row_positions, ceil_div, keys_in_tiles
from ..backends.host_copy import host_tensor
from ..estimators.tiles import compact, ranges_to_tiles
from .vertical_slash_cpu import key_counts


@dataclass(frozen=True)
class Pattern:
    """Base of the pattern dataclasses.  A subclass implements `build`, which makes the layout of a group of
    query heads that all use patterns of that subclass (budgets may differ per head)."""

    def __post_init__(self):
        if type(self).build.__func__ is Pattern.build.__func__:   # a base of patterns (no layout of its own)
            raise InvalidTypeError(f"{type(self).__name__} is a base class of patterns, not a pattern; use one of "
                                   f"its subclasses (e.g. VerticalSlash, AShape, BlockSparse, Dense)")
        reasons = self.invalid_reasons()
        if reasons:
            raise InvalidArgumentError(f"invalid {type(self).__name__}: " + "; ".join(reasons))

    def invalid_reasons(self) -> list[str]:
        reasons = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and value < 0:
                reasons.append(f"{f.name} must be >= 0, got {value!r}")
        return reasons

    #: whether `build` takes ``scores_backend`` (`estimators.score_backends`: which implementation scores a sample)
    takes_scores_backend = False

    def group_key(self):
        """Heads whose patterns share this key are estimated together by one `build` call."""
        return (type(self),)

    @classmethod
    def build(cls, patterns: list, heads: torch.Tensor, q, k, *, causal: bool, scale: float,
              block_m: int, block_n: int) -> SparseLayout:
        """Layout of the query heads ``heads`` (long [Hs]) of ``q [B, Hq, Lq, D]`` over ``k [B, Hkv, Lk, D]``,
        ``patterns[i]`` applying to ``heads[i]``."""
        raise NotImplementedError


def patterns_per_head(pattern, n_heads: int) -> list[Pattern]:
    """``pattern`` (one Pattern for every head, or a sequence of one per query head) as a list of ``n_heads``
    patterns; a clear ValueError otherwise."""
    if isinstance(pattern, Pattern):
        return [pattern] * n_heads
    if isinstance(pattern, Sequence) and not isinstance(pattern, str):
        if len(pattern) != n_heads:
            raise InvalidArgumentError(f"pattern: a per-head list must have one pattern per query head ({n_heads}), "
                             f"got {len(pattern)}")
        bad = [i for i, p in enumerate(pattern) if not isinstance(p, Pattern)]
        if bad:
            raise InvalidArgumentError(f"pattern: entries {bad} are not patterns (AShape, VerticalSlash, BlockSparse, Dense, "
                             f"Grid, QBoundary, TwoDBoundary)")
        return list(pattern)
    raise InvalidArgumentError(f"pattern must be a Pattern or a list of one Pattern per query head; got "
                     f"{type(pattern).__name__}")


def per_head(patterns: list, name: str, device) -> torch.Tensor:
    """One field of the group's patterns as a long tensor [Hs] (metadata, not a hot loop; no stream sync)."""
    return host_tensor([getattr(p, name) for p in patterns], dtype=torch.long, device=device)


def compacts_slots(device) -> bool:
    """Whether an estimator cuts its index slots to the fullest head, which reads a device value (a host sync):
    yes on the CPU, where it saves work for free; no on a GPU, where it would stall the stream (static widths)."""
    return torch.device(device).type != "cuda"


def layout_from_ranges(starts, ends, columns, column_keep, *, q_len, k_len, block_m, block_n, max_tiles):
    """Layout of tiles covering key ranges ``[starts, ends)`` [B, Hs, nQb, R] plus the columns
    ``columns [B, Hs, nQb, V]`` (where ``column_keep``) that no tile covers."""
    count, offsets = ranges_to_tiles(starts, ends, block_n, max_tiles)
    if columns is None or columns.shape[-1] == 0:
        B, H, n_qb = count.shape
        empty = torch.zeros(B, H, n_qb, 0, dtype=torch.int32, device=count.device)
        return SparseLayout(count, offsets, torch.zeros_like(count), empty, q_len=q_len, k_len=k_len,
                            block_m=block_m, block_n=block_n)
    used = torch.arange(offsets.shape[-1], device=offsets.device) < count[..., None]
    inside = keys_in_tiles(columns, offsets, used, block_n)
    col_count, col_index = compact(columns, column_keep & ~inside, columns.shape[-1])
    return SparseLayout(count, offsets, col_count, col_index, q_len=q_len, k_len=k_len, block_m=block_m,
                        block_n=block_n)


def tile_bound(k_len: int, block_n: int) -> int:
    """Disjoint tiles of width block_n starting inside [0, k_len) number at most this."""
    return ceil_div(k_len, block_n)


def computed_share(layout: SparseLayout, causal: bool = True) -> torch.Tensor:
    """Per batch row and head ``[B, H]`` (fp32): keys the kernel computes (whole query blocks x listed keys, cut
    at each block's last visible key) over the keys dense attention computes, block rows weighted by their row
    count.  What kernel time follows; cheaper than `SparseLayout.density` (no per-tile triangle sums)."""
    first, last = block_row_positions(layout.q_len, layout.k_len, layout.block_m, layout.device)
    rows = (last - first + 1).double()
    dense = (last + 1).double() if causal else torch.full_like(rows, layout.k_len)
    counts = key_counts(layout, causal)          # the same integers, compiled, on the CPU
    counts = layout.key_counts(causal) if counts is None else counts
    return ((counts.double() * rows).sum(-1) / (dense * rows).sum()).float()
