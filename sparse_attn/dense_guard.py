"""The "never slower than dense" guard of `sparse_prefill`: after the estimate, run dense attention when the sparse
kernel would take longer than dense SDPA on the same inputs.

The prediction is density x the backend's measured cost per computed key relative to dense SDPA (its attention time
over dense time x density, "attn/ideal" in `python -m sparse_attn bench`).  On a backend that computes a key dearer
than SDPA (torch, Triton against the GPU's default SDPA), a per-head mix with many dense heads (the default pattern's
choice for diffuse heads) is thereby sent to SDPA as a whole; the compiled CPU kernel computes every key cheaper
than SDPA (cost_per_key 0.6), so on the CPU the guard never fires and dense heads stay on the kernel."""
from __future__ import annotations

from .backends import BACKENDS, Backend
from .layout import SparseLayout
from .patterns.base import computed_share
#: Below this many keys the guard stays out: fixed costs dominate there, `sparse_prefill`'s ``dense_below`` decides
#: (and a caller who lowers it asks for the sparse path on purpose, e.g. to test it).
GUARD_MIN_KEYS = 4096


def sparse_is_slower(layout: SparseLayout, backend, *, causal: bool = True) -> bool:
    """Whether attention over ``layout`` on ``backend`` (a `Backend` or a backend's name, not "auto") is predicted
    to take at least as long as dense attention (its `Backend.cost_per_key`).  One host read (the density)."""
    if layout.k_len < GUARD_MIN_KEYS:
        return False
    if not isinstance(backend, Backend):
        backend = {b.name: b for b in BACKENDS}[backend]
    return float(computed_share(layout, causal).mean()) * backend.cost_per_key >= 1.0

