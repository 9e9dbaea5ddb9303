"""backend="cuda": the CUDA sources in ``csrc/`` compiled by CuPy's NVRTC on first use (`launcher`).  Opt-in:
the Triton kernel is the default on CUDA tensors."""
from __future__ import annotations

import torch

from ..base import Backend
from . import launcher


class CudaBackend(Backend):
    name = "cuda"
    # Relative to what the dense route runs.  H200, bf16, Llama-3-8B shapes: attention / (SDPA pinned to flash x
    # density) was 26 (4K), 32 (32K), 32 (128K), and torch's default SDPA ran 1.9-2.0x faster than flash at 16K: a
    # plain CUDA-core kernel (no tensor cores), so the guard keeps it off all but very sparse layouts.
    cost_per_key = 60.0
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

    def vertical_slash_index_reasons(self, vertical, kv_lens, context_size: int) -> list[str]:
        """Why the CUDA index kernel cannot convert ``vertical`` (its device decides first, so CPU callers never
        import CuPy); empty when it can."""
        if not vertical.is_cuda:
            return [f"vertical_indexes is on {vertical.device}; the CUDA index kernel needs CUDA tensors"]
        reasons = launcher.cuda_unavailable_reasons()
        if max(kv_lens, default=0) > context_size:
            reasons.append("a kv_seqlen exceeds context_size (the kernel sizes its tiles by context_size)")
        return reasons

    def vertical_slash_index(self, q_lens, kv_lens, vertical, slash, context_size, block_m, block_n, causal):
        """The block index of clipped vertical / slash indexes (see `launcher.vertical_slash_kernel`)."""
        dev = vertical.device
        return launcher.vertical_slash_kernel(torch.tensor(q_lens, dtype=torch.int32, device=dev),
                                              torch.tensor(kv_lens, dtype=torch.int32, device=dev), vertical, slash,
                                              context_size, block_m, block_n, causal)

    def _run(self, q, k, v, layout, *, causal, scale, return_lse, **options):
        return launcher.cuda_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse,
                                              **options)


CUDA = CudaBackend()
