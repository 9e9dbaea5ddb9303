"""backend="cpu": the compiled C++ kernel (``csrc/sparse_attention_cpu.cpp``, built on first use by `loader`)."""
from __future__ import annotations

import torch

from ..base import Backend
from . import loader


class CpuBackend(Backend):
    name = "cpu"
    cost_per_key = 2.0
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)      # fp64 stays on the torch backend, in fp64
    supports_softcap = True
    writes_out = True

    def _kernel_reasons(self, q, k, v, layout) -> list[str]:
        if not loader.available():
            return ["the compiled CPU kernel is unavailable on this machine (see the warning; no compiler or ninja, "
                    "or SPARSE_ATTN_CPU_KERNEL=0); use backend='torch'"]
        return []

    def _run(self, q, k, v, layout, *, causal, scale, return_lse, **options):
        return loader.cpu_kernel_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse,
                                           **options)


CPU = CpuBackend()
