"""Period detection for grid attention: the frame stride of a video from the diagonal mass of a query sample.

Video tokens attend to the same spatial position in other frames, so the attention mass per distance peaks at
multiples of the tokens per frame.  Each candidate period is scored by the mean mass (summed over a small window)
at its multiples; multiples of the true period score as high as it does, divisors about half as high, so the
smallest candidate within `tie` of the best wins.  All heads at once, no host sync."""
from __future__ import annotations

import torch


def detect_period(diag: torch.Tensor, min_period: int, max_period: int, *, window: int = 2,
                  min_distance: int = 1, min_contrast: float = 4.0, tie: float = 0.9) -> torch.Tensor:
    """Period per row of ``diag [..., N]`` (mass per distance 0..N-1): long ``[...]``, 0 where no candidate in
    ``[min_period, max_period]`` stands out (best score < ``min_contrast`` x the mean windowed mass at distances
    >= ``min_distance``).  Distances below ``min_distance`` (the local band) are not scored."""
    N = diag.shape[-1]
    lead = diag.shape[:-1]
    max_period = min(max_period, N - 1)
    if max_period < max(min_period, 1):
        return torch.zeros(lead, dtype=torch.long, device=diag.device)
    # Mass within +-window of each distance (prefix sums), distances below min_distance zeroed.
    d = diag.float().clone()
    d[..., :min(min_distance, N)] = 0
    csum = torch.nn.functional.pad(d.cumsum(-1), (1, 0))
    idx = torch.arange(N, device=diag.device)
    hi, lo = (idx + window + 1).clamp(max=N), (idx - window).clamp(min=0)
    windowed = csum[..., hi] - csum[..., lo]
    background = windowed[..., min(min_distance, N - 1):].mean(-1).clamp(min=1e-30)     # [...]
    # Every (candidate, multiple) pair with the multiple inside [min_distance, N).
    cand = torch.arange(max(min_period, 1), max_period + 1, device=diag.device)
    first_j = ((min_distance + cand - 1) // cand).clamp(min=1)
    counts = ((N - 1) // cand - first_j + 1).clamp(min=0)
    seg = torch.repeat_interleave(torch.arange(cand.shape[0], device=diag.device), counts)
    start = counts.cumsum(0) - counts
    j = torch.arange(seg.shape[0], device=diag.device) - start[seg] + first_j[seg]
    dist = cand[seg] * j
    score = torch.zeros(*lead, cand.shape[0], device=diag.device)
    score.index_add_(-1, seg, windowed[..., dist])
    score = score / counts.clamp(min=1)
    best = score.max(-1).values
    near_best = score >= tie * best[..., None]
    pick = near_best.to(torch.int8).argmax(-1)                       # first (smallest) candidate near the best
    period = cand[pick]
    return torch.where(best >= min_contrast * background, period, 0)
