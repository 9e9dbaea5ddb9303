"""A saved page file, read-only, with a writable page file on top for the tokens appended after it.

A context restored from SSD for a new request keeps reading its saved KV in place (nothing is copied), while the
request's own tokens go to a file of its own: the saved context stays byte for byte as saved, so the next request
can restore it too."""
from __future__ import annotations

import torch

from .page_file import PagedVectorFile
from ..errors import InvalidArgumentError


class OverlayVectorFile:
    """Tokens ``[0, base.count)`` from ``base`` (opened read-only), later ones from ``top``; the
    :class:`~.page_file.PagedVectorFile` interface the retrieval cache uses (append, gather, read_all, close)."""

    def __init__(self, base: PagedVectorFile, top: PagedVectorFile):
        if (base.streams, base.dim, base.dtype) != (top.streams, top.dim, top.dtype) or top.count:
            raise InvalidArgumentError(f"top must be an empty file of base's streams, dim and dtype "
                             f"({base.streams}, {base.dim}, {base.dtype})")
        self.base, self.top = base, top
        self.path, self.streams, self.dim, self.dtype = top.path, base.streams, base.dim, base.dtype

    @property
    def count(self) -> int:
        return self.base.count + self.top.count

    @property
    def bytes_read(self) -> int:
        return self.base.bytes_read + self.top.bytes_read

    def append(self, x: torch.Tensor) -> None:
        self.top.append(x)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx [S, m]`` positions (< count) -> ``[S, m, D]`` (rows of the other file read its edge page, unused)."""
        n = self.base.count
        if not self.top.count:
            return self.base.gather(idx)
        if not n:
            return self.top.gather(idx)
        in_base = idx < n
        out = self.base.gather(idx.clamp(max=n - 1))
        if not bool(in_base.all()):
            out = torch.where(in_base[..., None], out, self.top.gather((idx - n).clamp(min=0)))
        return out

    def read_all(self) -> torch.Tensor:
        return torch.cat([self.base.read_all(), self.top.read_all()], 1)

    def flush(self) -> None:
        self.top.flush()

    def close(self) -> None:
        self.base.close()
        self.top.close()

    def nbytes_disk(self) -> int:
        return self.base.nbytes_disk() + self.top.nbytes_disk()

    def nbytes_ram(self) -> int:
        return self.base.nbytes_ram() + self.top.nbytes_ram()
