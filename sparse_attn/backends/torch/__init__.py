"""backend="torch": plain torch ops on any device; the CPU fallback and the fp64 path (`attention`)."""
from __future__ import annotations

import torch

from ..base import Backend
from .attention import torch_sparse_attention


class TorchBackend(Backend):
    name = "torch"
    cost_per_key = 2.6
    supports_softcap = True
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def _run(self, q, k, v, layout, *, causal, scale, return_lse, **options):
        return torch_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse, **options)


TORCH = TorchBackend()
