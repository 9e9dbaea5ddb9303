"""Auto: per head, the cheapest of vertical-slash, block-sparse and dense that keeps the promised attention mass.

A sample of the last queries shows what every head needs, but it can mislead: a head whose mass is spread over keys
that change from row to row looks like a few heavy columns to 64 neighbouring rows.  So each candidate is checked on
*held-out* query rows spread over the sequence (attention of a few rows against all keys: O(rows x Lk)), and a head
takes the cheapest candidate that keeps ``gamma`` of their mass there:

1. rows of the sample that need more than ``dense_share`` of their keys for ``gamma`` -> dense (no sparse layout
   can be cheaper than the dense kernel there, and nothing more needs estimating);
2. vertical-slash with cumulative-mass budgets whose caps grow with the length, small minimums;
3. where that misses on the held-out rows: the same with MInference-style minimums (512 diagonals);
4. where that misses too: block-sparse with antidiagonal scores (XAttention);
5. otherwise dense.  A rung is taken where it keeps gamma on the held-out rows and is sparser than
   ``dense_share``.

Heads (and batch rows) may choose differently; the result is one `SparseLayout` (dense heads are aligned tiles), so
one kernel call still runs every head."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import SparseLayout
from ..backends.host_copy import host_tensor
from ..estimators import cpu_row_need
from ..estimators.mass_count import keys_for_mass
from ..estimators.sample_mass import last_query_probs
from ..estimators.score_backends import select_scores
from .base import Pattern, computed_share
from .block_sparse import BlockSparse
from .dense import Dense
from .vertical_slash import VerticalSlash

_NEED_KEY_STRIDE = 8
_WIDE_REACH = 0.1
#: Values of `build_with_choice`'s choice tensor.
VERTICAL_SLASH, BLOCK_SPARSE, DENSE, VERTICAL_SLASH_WIDE = 0, 1, 2, 3
CHOICE_NAMES = ("vertical_slash", "block_sparse", "dense", "vertical_slash_wide")


@dataclass(frozen=True)
class Auto(Pattern):
    """Per-head choice of layout kind (see the module docstring).

    * ``gamma``: the attention mass every head must keep.
    * ``last_q``: sample rows of the vertical-slash estimate; ``need_rows`` of them (the last) measure how many keys
      a row needs; ``check_rows`` held-out rows (spread evenly from an eighth of the queries to just before the
      sample) judge the candidates, which must keep ``gamma - tolerance`` of their mass there.
    * ``dense_share``: a head needing more than this share of its keys runs dense.
    * ``vertical_share`` / ``slash_share``: the vertical-slash caps as shares of the key length (never below
      MInference's 1000 / 6096, so short inputs keep the published budgets); ``min_vertical`` / ``min_slash``: the
      minimums kept whatever the sample says: 128 columns (heavy keys a 64-row sample under-ranks) and only the
      local band of diagonals, since the held-out rows (not a blanket margin of 512 diagonals) catch a sample
      that saw too little.
    * ``stride``: antidiagonal stride of the block-sparse scores."""

    gamma: float = 0.95
    last_q: int = 64
    need_rows: int = 16
    check_rows: int = 32
    tolerance: float = 0.01
    dense_share: float = 0.5
    vertical_share: float = 1 / 32
    slash_share: float = 0.5
    min_vertical: int = 128
    min_slash: int = 64
    stride: int = 16

    def invalid_reasons(self):
        reasons = super().invalid_reasons()
        for name in ("gamma", "dense_share", "vertical_share", "slash_share"):
            if not 0 < getattr(self, name) <= 1:
                reasons.append(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        for name in ("last_q", "need_rows", "stride"):
            if getattr(self, name) < 1:
                reasons.append(f"{name} must be >= 1, got {getattr(self, name)}")
        return reasons

    def group_key(self):
        return (type(self), self)                       # one build per distinct setting

    def vertical_slash(self, k_len: int) -> VerticalSlash:
        """The vertical-slash candidate at key length ``k_len``: caps that grow with the length."""
        return VerticalSlash(vertical=max(1000, math.ceil(self.vertical_share * k_len)),
                             slash=max(6096, math.ceil(self.slash_share * k_len)), last_q=self.last_q,
                             gamma=self.gamma, min_vertical=self.min_vertical, min_slash=self.min_slash)

    def vertical_slash_wide(self, k_len: int) -> VerticalSlash:
        """The second vertical-slash rung: MInference-style minimums (128 columns, 512 diagonals) for heads whose
        sample under-ranks what the other rows need."""
        return VerticalSlash(**{**self.vertical_slash(k_len).__dict__, "min_vertical": max(self.min_vertical, 128),
                                "min_slash": max(self.min_slash, 512)})

    def block_sparse(self) -> BlockSparse:
        return BlockSparse(gamma=self.gamma, scoring="antidiagonal", stride=self.stride)

    takes_scores_backend = True

    @classmethod
    def build(cls, patterns, heads, q, k, *, causal, scale, block_m, block_n, scores_backend="auto"):
        layout, _ = build_with_choice(patterns[0], heads, q, k, causal=causal, scale=scale, block_m=block_m,
                                      block_n=block_n, scores_backend=scores_backend)
        return layout


def build_with_choice(p: Auto, heads, q, k, *, causal, scale, block_m, block_n, scores_backend="auto"):
    """The layout of the query heads ``heads`` and the choice ``[B, Hs]`` (`CHOICE_NAMES` indexes it)
    made for each batch row and head.  Host syncs: a few (which heads need which estimate), on the CPU
    free; on a GPU they cost a stall per call, but save the estimates a head does not need."""
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    Hs, dev = heads.shape[0], q.device
    kw = dict(causal=causal, scale=scale, block_m=block_m, block_n=block_n)
    vs_kw = dict(kw, scores_backend=scores_backend)
    choice = torch.full((B, Hs), DENSE, dtype=torch.long, device=dev)
    candidates = {}                                              # kind -> (layout of the heads, those heads' slots)

    sparse_ok = _row_need(q, k, heads, p, scale, causal) <= p.dense_share               # [B, Hs]
    check = _check_rows(Lq, p, block_m).to(dev)
    if not check.numel():                                      # too short for held-out rows: trust the sample
        slots = _slots(sparse_ok.any(0))
        if slots.numel():
            candidates[VERTICAL_SLASH] = (VerticalSlash.build([p.vertical_slash(Lk)] * slots.numel(), heads[slots],
                                                              q, k, **vs_kw), slots)
            choice[sparse_ok] = VERTICAL_SLASH
    else:
        scorer = select_scores(scores_backend, q, k)
        # The ladder, cheapest kind first: each rung is estimated only for the heads no earlier rung served.
        rungs = {VERTICAL_SLASH: (VerticalSlash, p.vertical_slash(Lk)),
                 VERTICAL_SLASH_WIDE: (VerticalSlash, p.vertical_slash_wide(Lk)),
                 BLOCK_SPARSE: (BlockSparse, p.block_sparse())}
        near = torch.ones_like(sparse_ok)            # heads the wide rung may still serve
        for kind, (family, pattern) in rungs.items():
            open_ = sparse_ok & (choice == DENSE)
            if kind == VERTICAL_SLASH_WIDE:
                open_ = open_ & near
            slots = _slots(open_.any(0))
            if not slots.numel():
                continue
            lay = family.build([pattern] * slots.numel(), heads[slots], q, k,
                               **(vs_kw if family is VerticalSlash else kw))
            kept = torch.zeros(B, Hs, device=dev)
            dens = torch.ones(B, Hs, device=dev)
            kept[:, slots] = scorer.rows_kept_mass(q, k, check, scale, causal, heads=heads[slots], layout=lay)
            dens[:, slots] = computed_share(lay, causal)
            ok = open_ & (kept >= p.gamma - p.tolerance) & (dens <= p.dense_share)
            choice[ok] = kind
            if kind == VERTICAL_SLASH:
                # 448 more diagonals rescue a head that nearly made it, not one whose mass lies elsewhere
                near = kept >= p.gamma - _WIDE_REACH
            candidates[kind] = (lay, slots)
    dense_slots = _slots((choice == DENSE).any(0))
    if dense_slots.numel():
        candidates[DENSE] = (Dense.build([Dense()] * dense_slots.numel(), heads[dense_slots], q, k, **kw),
                             dense_slots)
    return _pick(candidates, choice, Hs), choice


def _of_heads(probs: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """``probs [B, Hq, ...]`` of the query heads ``heads`` (ascending, as `estimate` groups them): no copy when
    they are all the heads."""
    return probs if heads.numel() == probs.shape[1] else probs.index_select(1, heads)


def _slots(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


def _row_need(q, k, heads, p: Auto, scale, causal) -> torch.Tensor:
    """Per batch row and head ``[B, Hs]``: the largest share of its visible keys that one of the last
    ``need_rows`` queries needs for ``gamma`` of its mass (the smallest such key set: its top keys), measured on
    every ``_NEED_KEY_STRIDE``-th key (a sort of all keys cost a third of the estimate at 32K; scoring only
    those keys, an eighth of the GEMM: it is all an all-diffuse input pays before the dense guard), counted from a
    histogram instead of a sort (`keys_for_mass`).  Only ever routes a head to dense early, so an error costs time,
    never accuracy: the sparse choices are checked on their own.  On the CPU one compiled call counts the keys
    (`cpu_row_need`); `_row_keys_torch` is its readable reference and the path elsewhere."""
    Lq, Lk = q.shape[2], k.shape[2]
    n = min(p.need_rows, Lq)
    kw = dict(heads=heads, key_stride=_NEED_KEY_STRIDE, gamma=p.gamma)
    if cpu_row_need.takes(q, k):
        return cpu_row_need.cpu_row_need(q, k, n, scale, causal, **kw)[1]
    keys = _row_keys_torch(q, k, n, scale, causal, **kw)                              # [B, Hs, n]
    pos = torch.arange(Lk - n, Lk, device=q.device)
    visible = (pos + 1) if causal else torch.full_like(pos, Lk)
    visible = (visible + _NEED_KEY_STRIDE - 1) // _NEED_KEY_STRIDE                    # subsampled keys it sees
    return (keys / visible.float()).amax(-1)


def _row_keys_torch(q, k, n: int, scale, causal, *, heads, key_stride: int, gamma: float) -> torch.Tensor:
    """``[B, Hs, n]`` fp32: the keys each of the last ``n`` query rows of the query heads ``heads`` needs among
    every ``key_stride``-th key for ``gamma`` of its softmax mass over them (causal: those up to its position)."""
    probs, _ = last_query_probs(q, k, n, scale, causal, key_stride=key_stride)       # [B, Hq, n, Lk / stride]
    return keys_for_mass(_of_heads(probs, heads), gamma)


def _check_rows(q_len: int, p: Auto, block_m: int) -> torch.Tensor:
    """Held-out query rows: ``check_rows`` rows spread evenly over the queries before the sample (from an eighth of
    the way in: the first rows see few keys and say little), long ``[R]`` ascending; empty when too short."""
    end = q_len - p.last_q
    start = q_len // 8
    if p.check_rows == 0 or end - start < p.check_rows:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(start, end - 1, p.check_rows).round().long().unique()


def _pick(candidates: dict, choice: torch.Tensor, n_heads: int) -> SparseLayout:
    """One layout ``[B, n_heads]`` taking batch row b, head h from candidate ``choice[b, h]``; ``candidates``
    maps a kind to (its layout over some head slots, those slots)."""
    if len(candidates) == 1:                 # one kind for every head (e.g. all dense): nothing to merge
        kind, (lay, slots) = next(iter(candidates.items()))
        if slots.numel() == n_heads and bool((choice == kind).all()):
            return lay
    some = next(iter(candidates.values()))[0]
    B, n_qb = some.batch, some.num_query_blocks
    width_t = max(lay.block_offset.shape[-1] for lay, _ in candidates.values())
    width_c = max(lay.column_index.shape[-1] for lay, _ in candidates.values())
    dev = choice.device
    count_t = torch.zeros(B, n_heads, n_qb, dtype=torch.int32, device=dev)
    count_c = torch.zeros_like(count_t)
    offsets = torch.zeros(B, n_heads, n_qb, width_t, dtype=torch.int32, device=dev)
    columns = torch.zeros(B, n_heads, n_qb, width_c, dtype=torch.int32, device=dev)
    for kind, (lay, slots) in candidates.items():
        take = (choice[:, slots] == kind)                                             # [B, s]
        if not bool(take.any()):
            continue
        for name, full, width in (("block_count", count_t, None), ("column_count", count_c, None),
                                  ("block_offset", offsets, width_t), ("column_index", columns, width_c)):
            part = getattr(lay, name)
            if width is not None:
                part = torch.nn.functional.pad(part, (0, width - part.shape[-1]))
            sel = take.view(B, -1, *([1] * (part.dim() - 2)))
            full[:, slots] = torch.where(sel, part, full[:, slots])
    return SparseLayout(count_t, offsets, count_c, columns, q_len=some.q_len, k_len=some.k_len,
                        block_m=some.block_m, block_n=some.block_n)


def choose_per_head(q, k, pattern: Auto, *, causal: bool = True, scale=None, block_m: int = 64,
                    block_n: int = 64) -> torch.Tensor:
    """The choice ``[B, Hq]`` (`CHOICE_NAMES` indexes it) that ``pattern`` makes for every head: for audits."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads = host_tensor(list(range(q.shape[1])), dtype=torch.long, device=q.device)
    return build_with_choice(pattern, heads, q, k, causal=causal, scale=scale, block_m=block_m,
                             block_n=block_n)[1]
