"""backend="cuda": the CUDA sources in ``csrc/`` compiled by CuPy's NVRTC on first use (`launcher`).  Opt-in:
the Triton kernel is the default on CUDA tensors."""
from __future__ import annotations

import torch

from ..base import Backend
from . import launcher


class CudaBackend(Backend):
    name = "cuda"
    cost_per_key = 2.0
    supports_softcap = True
    devices = ("cuda",)
    dtypes = tuple(launcher.ATTENTION_DTYPES)
    in_auto = False

    def not_supported_reasons(self, q, k, v, layout=None, **options) -> list[str]:
        """The launcher checks the environment (CuPy, a GPU, CUDA tensors) itself and raises `CudaBackendError`
        naming every reason, so that its loader can be exercised on CPU tensors with a simulated CuPy."""
        reasons = super().not_supported_reasons(q, k, v, layout, **options)
        return [r for r in reasons if not r.startswith("q is on")]

    def _kernel_reasons(self, q, k, v, layout) -> list[str]:
        if q.shape[-1] not in launcher.ATTENTION_HEAD_DIMS:
            return [f"head_dim {q.shape[-1]} is not one of {launcher.ATTENTION_HEAD_DIMS}"]
        return []

    def _run(self, q, k, v, layout, *, causal, scale, return_lse, **options):
        return launcher.cuda_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse,
                                              **options)


CUDA = CudaBackend()
