"""backend="flex": compiled PyTorch FlexAttention on block-aligned layouts without columns (`attention`).  Opt-in:
each new shape costs a compile."""
from __future__ import annotations

from ..base import Backend
from .attention import flex_sparse_attention


class FlexBackend(Backend):
    name = "flex"
    cost_per_key = 2.1
    devices = ("cpu", "cuda")
    in_auto = False

    def not_supported_reasons(self, q, k, v, layout=None, *, return_lse: bool = False, **options) -> list[str]:
        reasons = super().not_supported_reasons(q, k, v, layout, **options)
        if return_lse and getattr(q, "device", None) is not None and q.device.type == "cpu":
            reasons.append("return_lse: compiled CPU FlexAttention cannot return the LSE; use backend='torch'")
        return reasons

    def _run(self, q, k, v, layout, *, causal, scale, return_lse, **options):
        return flex_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse, **options)


FLEX = FlexBackend()
