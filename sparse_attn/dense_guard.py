"""The "never slower than dense" guard of `sparse_prefill`: after the estimate, run dense attention when the sparse
kernel would take longer than dense SDPA on the same inputs.

The prediction is density x the backend's measured cost per computed key relative to dense SDPA (its attention time
over dense time x density, "attn/ideal" in `python -m sparse_attn bench`).  A per-head mix with many dense heads (the
default pattern's choice for diffuse heads) is thereby sent to SDPA as a whole: SDPA runs dense heads faster than
the sparse kernel runs them as tiles."""
from __future__ import annotations

from .layout import SparseLayout
from .patterns.base import computed_share

#: attention time / (dense SDPA time x density), per backend, on the 2-core CPU development machine
#: (bench/results/cpu-2core-2026-11-28-session4.txt: "cpu" 1.11-1.75 at 16K-32K, 2.07-2.22 at 64K; "torch"
#: 2.34-2.57; FlexAttention 1.8-2.1 on block covers).  "triton" and "cuda" are not measured yet (no GPU run):
#: MInference-like figures, to be replaced by the GPU check's numbers.
KERNEL_COST = {"cpu": 2.0, "torch": 2.6, "flex": 2.1, "triton": 1.5, "cuda": 2.0}
#: Below this many keys the guard stays out: fixed costs dominate there, `sparse_prefill`'s ``dense_below`` decides
#: (and a caller who lowers it asks for the sparse path on purpose, e.g. to test it).
GUARD_MIN_KEYS = 4096


def sparse_is_slower(layout: SparseLayout, backend: str, *, causal: bool = True) -> bool:
    """Whether attention over ``layout`` on ``backend`` (a resolved name, not "auto") is predicted to take at
    least as long as dense attention.  One host read (the density)."""
    if layout.k_len < GUARD_MIN_KEYS:
        return False
    return float(computed_share(layout, causal).mean()) * KERNEL_COST.get(backend, 1.0) >= 1.0

