"""Small tensors of host-known values (per-head budgets, head indices) on any device without a stream sync.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which blocks the host until the stream has
run everything queued before it; estimators build several such tensors per call, so each would stall the GPU
pipeline.  Staging them in pinned memory makes the copy asynchronous (the caching host allocator keeps the buffer
alive until the copy has run)."""
from __future__ import annotations

import torch


def host_tensor(values, dtype=None, device=None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``; on a CUDA device through a pinned, non-blocking copy."""
    cpu = torch.tensor(values, dtype=dtype)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cuda":
        return cpu.to(device)
    return cpu.pin_memory().to(device, non_blocking=True)
