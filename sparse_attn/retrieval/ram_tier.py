"""CPU RAM tier: growable per-stream buffers of offloaded keys (and values when they do not go to SSD)."""
from __future__ import annotations

import torch


def _pinned_if_cuda(t: torch.Tensor) -> torch.Tensor:
    """Page-locked memory when a CUDA device exists, so gathered rows copy to the GPU asynchronously."""
    return t.pin_memory() if torch.cuda.is_available() else t


class RamTier:
    """``streams`` buffers ``[capacity, dim]`` in ``dtype``; ``count`` tokens valid, appended together."""

    def __init__(self, streams: int, dim: int, dtype=torch.float16, capacity: int = 1024):
        self.streams, self.dim, self.dtype, self.count = streams, dim, dtype, 0
        self.data = _pinned_if_cuda(torch.empty(streams, max(1, capacity), dim, dtype=dtype))

    def append(self, x: torch.Tensor) -> None:
        """``x [S, n, D]``: the next ``n`` tokens of every stream (amortised O(n): capacity doubles)."""
        n = x.shape[1]
        if self.count + n > self.data.shape[1]:
            grown = _pinned_if_cuda(torch.empty(self.streams, max(2 * self.data.shape[1], self.count + n), self.dim,
                                                dtype=self.dtype))
            grown[:, :self.count] = self.data[:, :self.count]
            self.data = grown
        self.data[:, self.count:self.count + n] = x.detach().to("cpu", self.dtype)
        self.count += n

    def view(self) -> torch.Tensor:
        """The valid tokens, ``[S, count, D]`` (a view, no copy)."""
        return self.data[:, :self.count]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx [S, m]`` int64 positions -> ``[S, m, D]`` (one batched index op over all streams)."""
        cap = self.data.shape[1]
        flat = (idx + torch.arange(self.streams)[:, None] * cap).flatten()       # index_select beats fancy indexing
        return self.data.view(-1, self.dim).index_select(0, flat).view(*idx.shape, self.dim)

    def nbytes(self) -> int:
        """Bytes held (allocated capacity, not just the valid part)."""
        return self.data.numel() * self.data.element_size()
