"""backend="triton": one flash-attention kernel for any SparseLayout (`kernel`), launched by `launcher`.  Triton is
imported only when the kernel first runs."""
from __future__ import annotations

from ..base import Backend
from . import launcher


class TritonBackend(Backend):
    name = "triton"
    # Relative to what the dense route runs (SDPA as torch picks it).  H200, bf16, Llama-3-8B shapes: attention /
    # (SDPA pinned to flash x density) was 1.40 (4K, density 1), 1.20 (32K), 1.11-1.12 (128K); torch's default
    # SDPA backend ran 1.9-2.0x faster than flash at 16K, so against it about 2.1-2.8
    # (bench/results/gpu-check-h200-2026-12-04-s7*.txt).
    cost_per_key = 2.5
    supports_softcap = True
    devices = ("cuda", "cpu")                       # CPU only under TRITON_INTERPRET=1 (tests)
    auto_devices = ("cuda",)
    dtypes = launcher.TRITON_DTYPES
    head_dims = (launcher.MIN_HEAD_DIM, launcher.MAX_HEAD_DIM, 8)

    def _kernel_reasons(self, q, k, v, layout) -> list[str]:
        reasons = launcher.triton_not_supported_reasons(q, k, v, layout)
        generic = ("dtype must be", "head_dim must be")          # already said by the capability checks
        return [r for r in reasons if not r.startswith(generic)]

    def _run(self, q, k, v, layout, *, causal, scale, return_lse, **options):
        return launcher.triton_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse,
                                                **options)


TRITON = TritonBackend()
