"""Which implementation scores the vertical-slash sample: the same dispatch as the attention backends
(`backends.base.select`: capabilities on each object, one priority list, one error naming every reason).

* ``"triton"``: the fused Triton kernels (`triton_scores`), CUDA tensors (CPU only by name, under TRITON_INTERPRET=1);
* ``"cpu"``: the fused C++ pass (`cpu_scores`), CPU tensors of fp32 / bf16 where it could be built;
* ``"torch"``: the readable reference (`sample_mass.torch_sample_scores`), any device and dtype.

Each ``run(q, k, last_q, scale, causal, *, heads, sink, local, group)`` returns column, column-off-local and
diagonal mass ``[B, Hs, Lk]`` and ``on_diagonals(picked, group)`` (`sample_mass.GroupedScores`' contract);
``rows_kept_mass(q, k, rows, scale, causal, *, heads, layout)`` the mass held-out rows keep on a layout."""
from __future__ import annotations

import torch

from ..backends.base import Backend, select


class ScoreBackend(Backend):
    """A `Backend` whose ``run`` scores a query sample instead of running attention (``v`` is ``k`` in the checks)."""

    def run(self, q, k, last_q, scale, causal, *, heads, sink, local, group):
        raise NotImplementedError

    def rows_kept_mass(self, q, k, rows, scale, causal, *, heads, layout):
        """`row_sample.rows_kept_mass` (the reference, unless the backend has a fused pass)."""
        from .row_sample import rows_kept_mass
        return rows_kept_mass(q, k, rows, scale, causal, heads=heads, layout=layout)


class TorchScores(ScoreBackend):
    name = "torch"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def run(self, q, k, last_q, scale, causal, *, heads, sink, local, group):
        from .sample_mass import torch_sample_scores
        return torch_sample_scores(q, k, last_q, scale, causal, heads=heads, sink=sink, local=local, group=group)


class CpuScores(ScoreBackend):
    name = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)       # fp16 is scored in fp32

    def _kernel_reasons(self, q, k, v, layout) -> list[str]:
        from . import cpu_scores
        if not cpu_scores.available():
            return ["the fused CPU score pass is unavailable on this machine (see the warning)"]
        return []

    def run(self, q, k, last_q, scale, causal, *, heads, sink, local, group):
        from .cpu_scores import cpu_sample_scores
        return cpu_sample_scores(q, k, last_q, scale, causal, heads=heads, sink=sink, local=local, group=group)

    def rows_kept_mass(self, q, k, rows, scale, causal, *, heads, layout):
        from .cpu_scores import cpu_rows_kept_mass
        return cpu_rows_kept_mass(q, k, rows, scale, causal, heads=heads, layout=layout)


class TritonScores(ScoreBackend):
    name = "triton"
    devices = ("cuda", "cpu")                       # CPU only under TRITON_INTERPRET=1 (tests)
    auto_devices = ("cuda",)

    def _kernel_reasons(self, q, k, v, layout) -> list[str]:
        from .triton_scores import scores_not_supported_reasons      # a spec lookup, no triton import
        return scores_not_supported_reasons(q, k, 1)

    def run(self, q, k, last_q, scale, causal, *, heads, sink, local, group):
        from .triton_scores import triton_sample_scores
        return triton_sample_scores(q, k, last_q, scale, causal, heads=heads, sink=sink, local=local)


TRITON_SCORES, CPU_SCORES, TORCH_SCORES = TritonScores(), CpuScores(), TorchScores()
#: The order ``scores="auto"`` tries them.
SCORE_BACKENDS: tuple = (TRITON_SCORES, CPU_SCORES, TORCH_SCORES)
SCORE_BACKEND_NAMES: tuple = ("auto",) + tuple(b.name for b in SCORE_BACKENDS)


def select_scores(choice: str, q, k) -> ScoreBackend:
    """The score implementation ``choice`` means for these tensors ("auto": the first of `SCORE_BACKENDS` that
    can run them).  Raises `NotSupportedError` listing every reason where none can."""
    return select(SCORE_BACKENDS, choice, q, k, k)
