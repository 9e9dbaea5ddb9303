"""Period detection for grid attention: the frame stride of a video from the diagonal mass of a query sample.

Video tokens attend to the same spatial position in other frames, so the attention mass per distance peaks at
multiples of the tokens per frame.  Each candidate period is scored by the excess mass (over the mean, summed in a
small window) at its multiples, summed and divided by the square root of the number of multiples: the true period
collects every peak, its multiples only some of them and its divisors add as many troughs as peaks, so both score
lower; candidates with few multiples are not favoured by chance.  All heads at once, no host sync."""
from __future__ import annotations

import torch


def detect_period(diag: torch.Tensor, min_period: int, max_period: int, *, window: int = 2,
                  min_distance: int = 1, min_contrast: float = 4.0) -> torch.Tensor:
    """Period per row of ``diag [..., N]`` (mass per distance 0..N-1): long ``[...]``, 0 where no candidate in
    ``[min_period, max_period]`` stands out (the mean windowed mass at the best candidate's multiples is below
    ``min_contrast`` x the mean at all distances >= ``min_distance``).  Distances below ``min_distance`` (the local
    band) are not scored."""
    N = diag.shape[-1]
    lead = diag.shape[:-1]
    max_period = min(max_period, N - 1)
    if max_period < max(min_period, 1) or min_distance >= N:
        return torch.zeros(lead, dtype=torch.long, device=diag.device)
    # Mass within +-window of each distance (prefix sums), distances below min_distance zeroed.
    d = diag.float().clone()
    d[..., :min_distance] = 0
    csum = torch.nn.functional.pad(d.cumsum(-1), (1, 0))
    idx = torch.arange(N, device=diag.device)
    windowed = csum[..., (idx + window + 1).clamp(max=N)] - csum[..., (idx - window).clamp(min=0)]
    background = windowed[..., min_distance:].mean(-1, keepdim=True).clamp(min=1e-30)   # [..., 1]
    # Every (candidate, multiple) pair with the multiple inside [min_distance, N).
    cand = torch.arange(max(min_period, 1), max_period + 1, device=diag.device)
    first_j = ((min_distance + cand - 1) // cand).clamp(min=1)
    counts = ((N - 1) // cand - first_j + 1).clamp(min=0)
    seg = torch.repeat_interleave(torch.arange(cand.shape[0], device=diag.device), counts)
    start = counts.cumsum(0) - counts
    dist = cand[seg] * (torch.arange(seg.shape[0], device=diag.device) - start[seg] + first_j[seg])

    def scores(mass, base):
        total = torch.zeros(*lead, cand.shape[0], device=diag.device)
        total.index_add_(-1, seg, mass[..., dist] - base)
        return total, torch.where(counts > 0, total / counts.clamp(min=1).sqrt(), -torch.inf)

    excess, score = scores(windowed, background)
    best = score.argmax(-1)
    # The window blurs the peak by +-window candidates: pick among those by the exact-distance mass.
    _, exact = scores(d, d[..., min_distance:].mean(-1, keepdim=True))
    near = (cand - cand[best][..., None]).abs() <= window
    best = torch.where(near, exact, -torch.inf).argmax(-1)
    mean_at_best = excess.gather(-1, best[..., None])[..., 0] / counts[best].clamp(min=1) + background[..., 0]
    return torch.where(mean_at_best >= min_contrast * background[..., 0], cand[best], 0)
