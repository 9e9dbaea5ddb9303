"""Execution backends of a SparseLayout, each a `Backend` object (name, devices, dtypes, head dims,
``not_supported_reasons``, ``run``) in its own folder with its kernel, launcher and loader; plus the dense oracle
(`reference`), the LSE merge of partials (`merge`) and the JIT build cache (`jit`).

Never imports triton, CuPy, transformers or vLLM at import time."""
from __future__ import annotations

from .base import Backend, select
from .cpu import CPU
from .cuda import CUDA
from .flex import FLEX
from .torch import TORCH
from .triton import TRITON

#: Every backend, in the order ``backend="auto"`` tries them (opt-in ones last; "auto" skips them).
BACKENDS: tuple = (TRITON, CPU, TORCH, CUDA, FLEX)
#: What ``backend=`` accepts.
BACKEND_NAMES: tuple = ("auto",) + tuple(b.name for b in BACKENDS)


def select_backend(choice: str, q, k, v, layout=None, **options) -> Backend:
    """The `Backend` that ``backend=choice`` means for these inputs ("auto": the first of `BACKENDS` that can run
    them).  Raises `NotSupportedError` (a ValueError) listing every reason where none can."""
    return select(BACKENDS, choice, q, k, v, layout, **options)


__all__ = ["BACKENDS", "BACKEND_NAMES", "Backend", "select_backend"]
