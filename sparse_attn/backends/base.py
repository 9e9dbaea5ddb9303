"""What a backend is, and how ``backend="auto"`` picks one (xformers' dispatch: capabilities are attributes of
each backend, one priority list, one error naming every backend's reasons)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InvalidArgumentError, NotSupportedError
from .checks import attention_input_reasons


class Backend:
    """An engine that runs attention over a `SparseLayout`.

    Subclasses set the capability attributes and implement `_kernel_reasons` and `_run`.  ``run`` has
    `backends.torch.attention.torch_sparse_attention`'s contract: inputs already checked at the public boundary,
    output ``[B, Hq, Lq, D]`` in q's dtype and, with ``return_lse``, the natural-log LSE ``[B, Hq, Lq]`` in fp32."""

    name: str = ""
    #: device types it runs on ("cpu", "cuda"); empty: any device torch runs on
    devices: tuple = ()
    dtypes: tuple = (torch.float16, torch.bfloat16, torch.float32)
    #: (smallest, largest) head dim, and the step they must be a multiple of
    head_dims: tuple = (1, 1 << 30, 1)
    supports_lse: bool = True
    supports_softcap: bool = False
    #: attention time / (dense SDPA time x density): what `dense_guard` predicts with.  Measured on the 2-core CPU
    #: machine for "cpu", "torch" and "flex" (bench/results/cpu-2core-2026-11-28-session4.txt); "triton" and
    #: "cuda" are MInference-like guesses until the GPU check measures them.
    cost_per_key: float = 1.0
    #: whether ``"auto"`` may pick it (opt-in backends: a compile per shape, a test-only mode)
    in_auto: bool = True
    #: device types ``"auto"`` picks it on (empty: wherever it runs); Triton runs on CPU tensors only as a test mode
    auto_devices: tuple = ()
    #: whether `_run` takes ``out=`` and writes the result there (else `run` copies the result into ``out``)
    writes_out: bool = False

    def not_supported_reasons(self, q, k, v, layout=None, *, return_lse: bool = False,
                              softcap: float = 0.0) -> list[str]:
        """Every reason why this backend cannot run these inputs (empty: it can).  Reads no tensor data."""
        reasons = attention_input_reasons(q, k, v)
        if reasons:
            return reasons
        if self.devices and q.device.type not in self.devices:
            reasons.append(f"q is on {q.device}; it runs on {' or '.join(self.devices)} tensors")
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} is not one of {', '.join(str(d) for d in self.dtypes)}")
        low, high, step = self.head_dims
        if not (low <= q.shape[-1] <= high and q.shape[-1] % step == 0):
            reasons.append(f"head_dim {q.shape[-1]} is not a multiple of {step} in [{low}, {high}]")
        if return_lse and not self.supports_lse:
            reasons.append("it cannot return the LSE")
        if softcap and not self.supports_softcap:
            reasons.append("it does not implement softcap")
        return reasons + self._kernel_reasons(q, k, v, layout)

    def auto_reasons(self, q, k, v, layout=None, **options) -> list[str]:
        """Reasons why ``"auto"`` does not pick it: the above plus the backend's own auto rules."""
        if not self.in_auto:
            return ["opt-in only (not picked by 'auto')"]
        if self.auto_devices and q.device.type not in self.auto_devices:
            return [f"'auto' picks it on {' or '.join(self.auto_devices)} tensors only"]
        return self.not_supported_reasons(q, k, v, layout, **options)

    def run(self, q, k, v, layout, *, causal: bool, scale: float, return_lse: bool = False, softcap: float = 0.0,
            out=None):
        """``out``: where to write the output (q's shape and dtype, checked by the caller), returned in its place."""
        options = {"softcap": softcap} if softcap else {}
        if out is not None and self.writes_out:
            options["out"] = out
        result = self._run(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse, **options)
        if out is None or self.writes_out:
            return result
        if return_lse:
            return out.copy_(result[0]), result[1]
        return out.copy_(result)

    def _kernel_reasons(self, q, k, v, layout) -> list[str]:
        return []

    def _run(self, q, k, v, layout, *, causal, scale, return_lse, **options):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<sparse_attn backend {self.name!r}>"


def select(backends: Sequence[Backend], choice: str, q, k, v, layout=None, **options) -> Backend:
    """The backend named ``choice``, or for ``"auto"`` the first in ``backends`` (the priority list) that can run
    these inputs.  Raises `NotSupportedError` naming every reason where the choice cannot run them."""
    by_name = {b.name: b for b in backends}
    if choice != "auto" and choice not in by_name:
        raise InvalidArgumentError(f"backend must be 'auto' or one of {tuple(by_name)}, got {choice!r}")
    if choice != "auto":
        reasons = by_name[choice].not_supported_reasons(q, k, v, layout, **options)
        if reasons:
            raise NotSupportedError(f"backend={choice!r} cannot run these inputs: " + "; ".join(reasons))
        return by_name[choice]
    every = {}
    for backend in backends:
        reasons = backend.auto_reasons(q, k, v, layout, **options)
        if not reasons:
            return backend
        every[backend.name] = reasons
    raise NotSupportedError("no backend can run these inputs: " +
                            " | ".join(f"{name}: {'; '.join(r)}" for name, r in every.items()))
