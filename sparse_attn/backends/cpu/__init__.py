"""backend="cpu": the compiled C++ kernel (``csrc/sparse_attention_cpu.cpp``, built on first use by `loader`)."""
from __future__ import annotations

import torch

from ..base import Backend
from . import loader


class CpuBackend(Backend):
    name = "cpu"
    #: attention / (dense SDPA x density), 2-core CPU, 16K, fp32, after scoring long blocks in L2-sized segments:
    #: 0.28-0.46 on a dense causal layout, 0.38-0.65 on VerticalSlash(512, 1024), 0.29-0.49 on BlockSparse(top_k=64)
    #: (bench/results/cpu-dense-route-2core-2026-12-04-s8.txt); very sparse layouts cost more per key (the default's
    #: 1.2-1.35 at density 0.01-0.02), where the guard's product stays far below 1 anyway.
    cost_per_key = 0.6
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
