"""Vertical-slash (MInference-style): important key columns plus important diagonals, per head, chosen from the
attention of the last ``last_q`` queries."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import block_row_positions, ceil_div, kept_first
from ..backends.host_copy import host_tensor
from ..estimators.sample_mass import column_mass, diagonal_mass
from ..estimators.score_backends import select_scores
from . import vertical_slash_cpu
from .base import Pattern, compacts_slots, layout_from_ranges, per_head, tile_bound


@dataclass(frozen=True)
class VerticalSlashBudgets(Pattern):
    """The budgets of a vertical-slash estimate (see `VerticalSlash`), shared by the patterns that run one per
    part of the sequence (`sparse_attn.patterns.modality`)."""

    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    gamma: float | None = None
    min_vertical: int = 128
    min_slash: int = 512
    sink: int = 64
    local: int = 64

    def invalid_reasons(self):
        reasons = super().invalid_reasons()
        if self.last_q < 1:
            reasons.append(f"last_q must be >= 1, got {self.last_q}")
        if self.gamma is not None and not 0 < self.gamma <= 1:
            reasons.append(f"gamma must lie in (0, 1], got {self.gamma}")
        if self.sink > self.vertical:
            reasons.append(f"sink ({self.sink}) must be <= vertical ({self.vertical})")
        if self.local > self.slash:
            reasons.append(f"local ({self.local}) must be <= slash ({self.slash})")
        return reasons


@dataclass(frozen=True)
class VerticalSlash(VerticalSlashBudgets):
    """Columns (verticals) and diagonals (slashes) with the most attention mass in the last ``last_q`` queries.

    * ``vertical`` / ``slash``: budgets (numbers of key columns / diagonals).  With ``gamma`` they are the maximum
      and ``min_vertical`` / ``min_slash`` (clamped to them) the minimum; in between, the smallest set whose
      estimated attention mass reaches ``gamma`` (FlexPrefill's cumulative budget), taking the cheapest mass first.
      The minimum guards against a sample of ``last_q`` rows that sees less structure than the other rows need.
    * the first ``sink`` columns and the ``local`` nearest diagonals are always kept.
    * diagonals are chosen in groups of ``block_n`` neighbours (so ``slash`` is rounded up to a multiple of it): a
      rectangular tile computes a band of 64 diagonals anyway, so a lone diagonal would cost as much as its group.
    """

    def invalid_reasons(self):
        if self.vertical == 0 and self.slash == 0 and (self.sink or self.local):
            # VerticalSlash(0, 0): say what is wrong instead of "sink (64) must be <= vertical (0)".  With sink and
            # local 0 too it is the empty layout (kernel tests use it); a model config refuses it
            # (`sparse_attn.config.empty_budget_reason`).
            return ["vertical and slash are both 0, so no key would be kept (an all-zero output); give vertical >= 1 "
                    "or slash >= 1"]
        return super().invalid_reasons()

    def group_key(self):
        return (type(self), self.last_q)

    #: `estimate`'s ``scores_backend`` choice reaches `build` (`estimators.score_backends`)
    takes_scores_backend = True

    @classmethod
    def build(cls, patterns, heads, q, k, *, causal, scale, block_m, block_n, scores_backend="auto"):
        """``scores_backend``: which implementation scores the sample (`estimators.score_backends`: "triton" the fused
        Triton kernels, "cpu" the fused C++ pass, "torch" the readable reference; "auto" by the tensors' device).
        None of them holds the [last_q, Lk] probabilities twice or syncs with the host."""
        B, Hq, Lq, _ = q.shape
        Lk, dev = k.shape[2], q.device
        n_buckets = ceil_div(Lk, block_n)
        prm = {name: per_head(patterns, name, dev) for name in ("sink", "local", "vertical", "min_vertical")}
        prm["slash"] = (per_head(patterns, "slash", dev) + block_n - 1) // block_n          # in diagonal groups
        prm["min_slash"] = (per_head(patterns, "min_slash", dev) + block_n - 1) // block_n
        prm["gamma"] = host_tensor([2.0 if p.gamma is None else p.gamma for p in patterns], device=dev)
        # Host-known maxima (no device read): widths of the top-k and of the slices the corrections touch.
        width_v = max(1, min(max(p.vertical for p in patterns), Lk))
        width_s = max(1, min(max(ceil_div(p.slash, block_n) for p in patterns), n_buckets))
        n = min(patterns[0].last_q, Lq)
        gamma_mode = any(p.gamma is not None for p in patterns)
        sample = select_scores(scores_backend, q, k).run(q, k, n, scale, causal, heads=heads, sink=prm["sink"],
                                                 local=prm["local"], group=block_n)
        groups_of = group_mass(sample.diagonal, block_n, n_buckets)
        max_tiles_per_slot = _tiles_per_group(block_m, block_n)
        if compacts_slots(dev) and vertical_slash_cpu.takes(sample, dev, n, block_n):
            # The same layout from one compiled call (the torch ops below are its readable reference; it cuts the
            # slots to the fullest head as they do where `compacts_slots`).
            return vertical_slash_cpu.vertical_slash_layout(
                sample, groups_of, dict(prm, target=prm["gamma"] * n), gamma_mode=gamma_mode, causal=causal,
                q_len=Lq, block_m=block_m, block_n=block_n, width_v=width_v, width_s=width_s,
                tiles_per_group=max_tiles_per_slot)
        verticals, v_ok, buckets, s_ok = _choose(
            sample.column, sample.column_off_local, groups_of, n, prm, block_n, n_buckets, width_v, width_s,
            gamma_mode, lambda picked: sample.on_diagonals(picked, block_n))

        if compacts_slots(dev):
            # Keep only as many slots as the fullest head uses (one sync, free on the CPU): per-block work below
            # scales with them.  On a GPU the sync would stall the stream: keep the static widths.
            n_v, n_s = max(int(v_ok.sum(-1).max()), 1), max(int(s_ok.sum(-1).max()), 1)
            v_first = kept_first(v_ok, n_v)
            s_first = kept_first(s_ok, n_s)
            verticals, v_ok = verticals.gather(-1, v_first), v_ok.gather(-1, v_first)
            buckets, s_ok = buckets.gather(-1, s_first), s_ok.gather(-1, s_first)

        first, last = block_row_positions(Lq, Lk, block_m, dev)                       # [nQb]
        d0 = (buckets * block_n)[:, :, None, :]                                        # [B, Hs, 1, nb]
        starts = (first[:, None] - d0 - block_n + 1).clamp(min=0)
        ends = (last[:, None] - d0 + 1).clamp(max=Lk)
        ends = torch.where(s_ok[:, :, None, :], ends, starts)                          # unused group: empty
        big = torch.iinfo(torch.int64).max
        verticals = torch.where(v_ok, verticals, big).sort(-1).values                  # ascending, padding last
        cols = verticals[:, :, None, :].expand(-1, -1, first.shape[0], -1)
        keep = cols < big
        if causal:
            keep = keep & (cols <= last[:, None])
        cols = torch.where(keep, cols, 0)
        return layout_from_ranges(starts, ends, cols, keep, q_len=Lq, k_len=Lk, block_m=block_m, block_n=block_n,
                                  max_tiles=min(buckets.shape[-1] * max_tiles_per_slot, tile_bound(Lk, block_n)))


def _select(probs, pos, prm, block_n, n_buckets, width_v, width_s, column_mass=column_mass, host=None):
    """Diagonal groups, then columns, for the sample ``probs [B, h, n, Lk]`` at key positions ``pos [n]``
    (see `_choose`).  ``column_mass`` (probs -> [B, h, Lk]) scores the columns (the modality patterns pass a
    score a diagonal crossing the sample cannot fake).  ``host``: the host-known values ``first_pos`` (pos[0]),
    ``max_local``, ``max_sink``, ``gamma_mode`` (read from the tensors when not given: a host sync each)."""
    B, h, n, Lk = probs.shape
    dev = probs.device
    if host is None:
        host = dict(first_pos=int(pos[0]), max_local=int(prm["local"].max()), max_sink=int(prm["sink"].max()),
                    gamma_mode=bool((prm["gamma"] <= 1).any()))
    keys = torch.arange(Lk, device=dev)
    local = prm["local"][:, None]
    force_v = keys < prm["sink"][:, None]                                              # [h, Lk]
    col_all = column_mass(probs)
    # Column mass without the forced local band, diagonal mass without the forced sink columns, so an entry kept
    # anyway is not counted for the other kind too.  Both bands are narrow: work on those slices only.
    tail = max(0, host["first_pos"] - host["max_local"] + 1)
    dist_tail = pos[:, None] - keys[tail:]
    near = (dist_tail >= 0) & (dist_tail < local[:, :, None])                          # [h, n, Lk - tail]
    col = col_all.clone()
    col[..., tail:] -= column_mass(probs[..., tail:] * near)
    n_sink = min(host["max_sink"], Lk)
    diag = diagonal_mass(probs, pos) - diagonal_mass(probs[..., :n_sink] * force_v[:, None, :n_sink], pos, Lk)

    def on_slash(picked):
        # Row r's key j lies at distance pos[r] - j, so with the per-distance mask reversed (and zeros for
        # negative distances) its mask over the keys is the window starting at Lk - 1 - pos[r]: windows of a
        # strided view, copied as whole rows (an [n, Lk] index into `picked` cost 3x more).
        by_dist = picked[..., :n_buckets].repeat_interleave(block_n, -1)[..., :Lk].to(probs.dtype)   # [B, h, Lk]
        reversed_dist = torch.cat([by_dist.flip(-1), torch.zeros_like(by_dist)], -1)                  # [B, h, 2 Lk]
        windows = reversed_dist.unfold(-1, Lk, 1)                                                    # [B, h, Lk + 1, Lk]
        mask = windows.index_select(2, (Lk - 1 - pos).clamp(min=0, max=Lk))                           # [B, h, n, Lk]
        return column_mass(mask.mul_(probs))

    return _choose(col_all, col, group_mass(diag, block_n, n_buckets), n, prm, block_n, n_buckets, width_v,
                   width_s, host["gamma_mode"], on_slash)


def group_mass(diag, block_n: int, n_buckets: int) -> torch.Tensor:
    """Mass per diagonal group ``[B, h, n_buckets]`` (groups of ``block_n`` distances) of ``diag [B, h, Lk]``."""
    Lk = diag.shape[-1]
    if n_buckets * block_n != Lk:                                  # (a pad copies all of diag)
        diag = torch.nn.functional.pad(diag, (0, n_buckets * block_n - Lk))
    return diag.reshape(*diag.shape[:2], -1, block_n).sum(-1)


def order_key(score: torch.Tensor) -> torch.Tensor:
    """An int64 key per entry of ``score [..., N]`` (fp32) ordering the entries by value, equal values by the lower
    index first: the float's bits as an ordered int32 (negative floats flipped) above 32 bits of (2^32 - 1 - index).
    No two keys tie, so a top-k or sort of the keys has one answer on every device and in the compiled CPU path."""
    bits = score.to(torch.float32).contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return ordered * 2 ** 32 + (2 ** 32 - 1 - torch.arange(score.shape[-1], device=score.device))


def _choose(col_all, col, group_mass, n, prm, block_n, n_buckets, width_v, width_s, gamma_mode, on_slash):
    """Diagonal groups first (by mass, or with gamma by the cheapest-mass order over both kinds), then columns
    by mass; with gamma the columns are added until the mass *not already on a chosen diagonal* completes gamma,
    so the union reaches gamma of the sample's mass exactly (within the budgets).

    ``col_all [B, h, Lk]``: column mass of the ``n`` sample rows; ``col``: the same without the forced local band;
    ``group_mass [B, h, nB]``: mass per diagonal group without the forced sink columns (`group_mass`); ``on_slash(picked [B, h, nB + 1])``:
    column mass on the picked diagonal groups (gamma only).  Returns (verticals [B, h, width_v], kept, groups
    [B, h, width_s], kept).  No host sync."""
    B, h, Lk = col_all.shape
    dev = col_all.device
    force_v = torch.arange(Lk, device=dev) < prm["sink"][:, None]                      # [h, Lk]
    force_s = torch.arange(n_buckets, device=dev) * block_n < prm["local"][:, None]    # [h, nB]
    target = prm["gamma"] * n                                                          # [h]
    chosen_s = None
    if gamma_mode:
        chosen_s = _cheapest_slashes(col, group_mass, block_n, target[:, None], force_v, force_s)
    groups, s_ok = _top_within(group_mass, force_s, prm["slash"], prm["min_slash"], chosen_s, width_s)
    chosen_v = None
    if gamma_mode:
        # Columns keep their mass ranking (a column's mass elsewhere in the sequence is not on these diagonals),
        # but count only the mass no chosen diagonal holds, so the union reaches gamma of the sample exactly.
        picked = torch.zeros(B, h, n_buckets + 1, dtype=torch.bool, device=dev)
        picked.scatter_(-1, torch.where(s_ok, groups, n_buckets), True)
        picked[..., n_buckets] = False
        on_slash_cols = on_slash(picked)                                               # [B, h, Lk]
        residual = col_all - on_slash_cols
        # [B, h]; summed in fp64 so that any summation order (the compiled CPU path's too) rounds to the same fp32
        covered = on_slash_cols.sum(-1, dtype=torch.float64).float()
        # only the top width_v columns by mass can be kept (`_top_within` ranks them the same way): a top-k, not a
        # sort of all Lk
        order = order_key(torch.where(force_v, math.inf, col)).topk(min(width_v, Lk), dim=-1).indices
        mass = residual.gather(-1, order)
        reached = (mass.cumsum(-1) - mass) < (target - covered)[..., None]
        chosen_v = torch.zeros(col.shape, dtype=torch.bool, device=dev).scatter_(-1, order, reached)
    verticals, v_ok = _top_within(col, force_v, prm["vertical"], prm["min_vertical"], chosen_v, width_v)
    return verticals, v_ok, groups, s_ok


def _tiles_per_group(block_m: int, block_n: int) -> int:
    """Most tiles one diagonal group adds to a query block.  Alone it spans block_m + block_n - 1 keys; in a
    merged run, consecutive groups are at most floor((block_m + 2 block_n - 2) / block_n) groups apart (else the
    gap is >= block_n and they are not merged), and each adds that many block_n steps of span."""
    return max((block_m + 2 * block_n - 2) // block_n, ceil_div(block_m + block_n - 1, block_n))


def _top_within(score, forced, max_budget, min_budget, chosen, width):
    """Top ``width`` indices of ``score [B, h, N]`` (forced entries first) and which are kept: rank < the head's
    max budget, and (forced, rank < min budget, or ``chosen`` by the mass budget when given)."""
    width = min(width, score.shape[-1])
    ranked = order_key(torch.where(forced, math.inf, score)).topk(width, dim=-1)
    rank = torch.arange(width, device=score.device)
    keep = (rank < max_budget[:, None]).expand_as(ranked.indices)
    if chosen is not None:
        picked = chosen.gather(-1, ranked.indices) | forced.expand_as(score).gather(-1, ranked.indices)
        keep = keep & (picked | (rank < min_budget[:, None]))
    return ranked.indices, keep


#: `_cheapest_slashes` on the CPU looks at this many of the highest-value entries first (a top-k), and sorts all of
#: them only where those do not reach the target (a sort of Lk + Lk / 64 entries per head cost 10 ms at 32K).
_CHEAPEST_FIRST = 2048


def _cheapest_slashes(col, group_mass, block_n, target, force_v, force_s):
    """Diagonal groups [B, h, nB] (bool) of the smallest set of columns (cost 1 key per row) and diagonal groups
    (cost block_n) whose mass reaches ``target [h, 1]``, taking the most mass per key first, forced ones first."""
    mass = torch.cat([col, group_mass], -1)
    value = torch.cat([torch.where(force_v, math.inf, col), torch.where(force_s, math.inf, group_mass / block_n)],
                      -1)
    if compacts_slots(col.device) and value.shape[-1] > _CHEAPEST_FIRST:
        # Entries past the top _CHEAPEST_FIRST are kept only where the walk does not stop among those (their last
        # is still kept): elsewhere the sorted prefix decides alone, and the answer is the full sort's (one host
        # read, free on the CPU).
        top = order_key(value).topk(_CHEAPEST_FIRST, -1).indices
        keep_sorted = _kept_in_order(mass.gather(-1, top), target)
        if not bool(keep_sorted[..., -1].any()):
            return _as_mask(top, keep_sorted, value.shape)[..., col.shape[-1]:]
    order = order_key(value).argsort(-1, descending=True)
    return _as_mask(order, _kept_in_order(mass.gather(-1, order), target), value.shape)[..., col.shape[-1]:]


def _kept_in_order(sorted_mass, target):
    """Which entries of ``sorted_mass [..., m]`` (best first) are taken: those whose mass before them is below
    ``target`` (cumulative sums as torch takes them on the CPU: accumulated in fp64, rounded to fp32)."""
    return (sorted_mass.cumsum(-1) - sorted_mass) < target


def _as_mask(order, keep_sorted, shape):
    """``keep_sorted`` of the entries ``order [..., m]`` as a bool mask of ``shape``."""
    return torch.zeros(shape, dtype=torch.bool, device=order.device).scatter_(-1, order, keep_sorted)
