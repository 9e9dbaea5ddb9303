"""Device tier: the first ``sink`` tokens and the last ``window`` tokens of every KV head, kept exact."""
from __future__ import annotations

import torch
from ..errors import InvalidArgumentError


class DeviceWindow:
    """Sinks + a sliding recent window, ``[B, Hkv, n, D]`` on the KV's own device and dtype.

    ``append`` returns the tokens pushed out of the window (oldest first) so the caller can offload them."""

    def __init__(self, sink: int, window: int):
        if sink < 0 or window < 0:
            raise InvalidArgumentError(f"sink and window must be >= 0, got sink={sink}, window={window}")
        self.sink, self.window = sink, window
        self.k = self.v = None           # [B, Hkv, n_static, D]: sinks first, then the recent window
        self.pos = None                  # [n_static] int64 absolute token positions
        self.seen = 0                    # tokens appended so far

    @property
    def n_sink(self) -> int:
        return min(self.sink, self.seen)

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """``k, v [B, Hkv, n, D]``; returns ``(k_out, v_out)`` ``[B, Hkv, m, D]`` evicted from the window (m may be
        0), in position order: every evicted token is older than every token still in the window."""
        n = k.shape[2]
        pos = torch.arange(self.seen, self.seen + n, device=k.device)
        if self.k is None:
            self.k, self.v, self.pos = k[:, :, :0], v[:, :, :0], pos[:0]
        k_all = torch.cat([self.k, k], 2)
        v_all = torch.cat([self.v, v], 2)
        pos_all = torch.cat([self.pos.to(k.device), pos])
        self.seen += n
        n_sink = self.n_sink
        keep_recent = min(self.window, k_all.shape[2] - n_sink)
        cut = k_all.shape[2] - keep_recent                       # [n_sink, cut) leaves the window
        self.k = torch.cat([k_all[:, :, :n_sink], k_all[:, :, cut:]], 2)
        self.v = torch.cat([v_all[:, :, :n_sink], v_all[:, :, cut:]], 2)
        self.pos = torch.cat([pos_all[:n_sink], pos_all[cut:]])
        return k_all[:, :, n_sink:cut], v_all[:, :, n_sink:cut]

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()
