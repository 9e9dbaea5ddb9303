"""backend="flex": compiled PyTorch FlexAttention on block-aligned layouts without columns (`attention`).  Opt-in:
each new shape costs a compile."""
from __future__ import annotations

from ..base import Backend
from .attention import flex_sparse_attention, gpu_tile


class FlexBackend(Backend):
    name = "flex"
    cost_per_key = 2.1
    devices = ("cpu", "cuda")
    in_auto = False

    def not_supported_reasons(self, q, k, v, layout=None, *, return_lse: bool = False, **options) -> list[str]:
        reasons = super().not_supported_reasons(q, k, v, layout, **options)
        device = getattr(q, "device", None)
        if return_lse and device is not None and device.type == "cpu":
            reasons.append("return_lse: compiled CPU FlexAttention cannot return the LSE; use backend='torch'")
        if layout is not None and device is not None and device.type == "cuda":
            small = [f"{name}={block}" for name, block in (("block_m", layout.block_m), ("block_n", layout.block_n))
                     if gpu_tile(block) < 16]
            if small:
                reasons.append(f"layout {', '.join(small)}: FlexAttention on CUDA needs blocks divisible by 16")
        return reasons

    def _run(self, q, k, v, layout, *, causal, scale, return_lse, **options):
        return flex_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse, **options)


FLEX = FlexBackend()
