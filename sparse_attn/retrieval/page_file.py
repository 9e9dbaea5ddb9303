"""SSD tier: vectors of ``S`` streams (batch x KV head) in one file of fixed-size, checksummed pages.

File ``<path>`` = a 4096-byte header (magic, version, JSON meta: streams, dim, dtype, page_tokens; CRC of the
meta) followed by pages.  Page ``p`` of stream ``s`` holds tokens ``[p * P, (p + 1) * P)`` and sits in slot
``p * S + s`` (all streams grow together, so no slot table is needed and a run of full pages is one write).
``<path>.table`` = the token count and one zlib.crc32 per written page, rewritten atomically on ``flush``.
Reads check every page's CRC; a short file, a bad header, or a flipped byte raise :class:`KVFileError` naming
the file, so a damaged tier can never produce attention silently.  A bounded LRU keeps hot pages in RAM.
``open(..., read_only=True)`` never writes (a saved context shared by later requests stays as it was saved)."""
from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import torch

from ..errors import InvalidArgumentError, SparseAttnError
from .page_cache import PageCache
from ..layout import ceil_div

MAGIC, TABLE_MAGIC, VERSION, HEADER_BYTES = b"SPATTNKV", b"SPATTNPT", 1, 4096
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NP_VIEW = {torch.float16: np.float16, torch.bfloat16: np.int16, torch.float32: np.float32}


class KVFileError(SparseAttnError, ValueError):
    """A KV tier file is missing, truncated, corrupted, or of another format/version."""


def check_writable_dir(directory, name: str = "ssd_dir") -> str:
    """Create ``directory`` if needed and prove it is writable by creating a file there."""
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write_probe_{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise InvalidArgumentError(f"{name} must be a writable directory, got {directory!r} ({err.strerror or err})") from None
    return directory


class PagedVectorFile:
    """``S`` streams of ``dim``-vectors, appended together, stored in pages of ``page_tokens`` tokens."""

    def __init__(self, path, streams: int, dim: int, dtype=torch.float16, page_tokens: int = 16,
                 cache_pages: int = 4096, _create: bool = True):
        if dtype not in _NP_VIEW:
            raise InvalidArgumentError(f"dtype must be one of {sorted(map(str, _NP_VIEW))}, got {dtype}")
        if page_tokens < 1 or streams < 1 or dim < 1:
            raise InvalidArgumentError(f"page_tokens, streams, dim must be >= 1, got {page_tokens}, {streams}, {dim}")
        self.path, self.streams, self.dim, self.dtype, self.P = os.fspath(path), streams, dim, dtype, page_tokens
        self.page_bytes = page_tokens * dim * torch.tensor([], dtype=dtype).element_size()
        self.count, self.read_only, self.bytes_read = 0, False, 0
        self.crc = np.zeros((0, streams), dtype=np.uint32)        # [pages, S]
        self.staging = torch.zeros(streams, page_tokens, dim, dtype=dtype)   # the partial last page
        self.cache = PageCache(cache_pages)
        if _create:
            check_writable_dir(os.path.dirname(self.path) or ".", "ssd_dir")
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self._fd, self._header(), 0)
            self.flush()

    # ------------------------------------------------------------------------------------------------ format
    def _header(self) -> bytes:
        meta = json.dumps({"streams": self.streams, "dim": self.dim, "dtype": str(self.dtype).split(".")[-1],
                           "page_tokens": self.P}).encode()
        head = MAGIC + struct.pack("<III", VERSION, len(meta), zlib.crc32(meta)) + meta
        if len(head) > HEADER_BYTES:
            raise InvalidArgumentError("header too long")
        return head.ljust(HEADER_BYTES, b"\0")

    @classmethod
    def open(cls, path, cache_pages: int = 4096, read_only: bool = False) -> "PagedVectorFile":
        """Reopen a file written (and flushed) by an earlier process; checks header, table and size.
        ``read_only``: open it for reading only; ``append`` then raises and ``flush``/``close`` write nothing."""
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as err:
            raise KVFileError(f"cannot open KV file {path!r}: {err.strerror}") from None
        head = os.pread(fd, HEADER_BYTES, 0)
        if len(head) < 20 or head[:8] != MAGIC:
            os.close(fd)
            raise KVFileError(f"{path!r} is not a sparse_attn KV file (bad magic or truncated header)")
        version, meta_len, meta_crc = struct.unpack("<III", head[8:20])
        meta = head[20:20 + meta_len]
        if version != VERSION or zlib.crc32(meta) != meta_crc:
            os.close(fd)
            raise KVFileError(f"{path!r}: header version {version} (expected {VERSION}) or header checksum mismatch")
        m = json.loads(meta)
        self = cls(path, m["streams"], m["dim"], _DTYPES[m["dtype"]], m["page_tokens"], cache_pages, _create=False)
        self._fd, self.read_only = fd, read_only
        self.count, self.crc = self._read_table()
        n_pages = self.crc.shape[0]
        need = HEADER_BYTES + n_pages * self.streams * self.page_bytes
        size = os.fstat(fd).st_size
        if size < need:
            raise KVFileError(f"{path!r} is truncated: {size} bytes, its table needs {need} "
                              f"({n_pages} pages x {self.streams} streams x {self.page_bytes} bytes + header)")
        if self.count % self.P:                                    # reload the partial last page for appends
            self.staging.copy_(self._read_pages(n_pages - 1))
        return self

    def _read_table(self):
        table = self.path + ".table"
        try:
            with open(table, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise KVFileError(f"missing page table {table!r}: {err.strerror}") from None
        if len(raw) < 32 or raw[:8] != TABLE_MAGIC or zlib.crc32(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
            raise KVFileError(f"page table {table!r} is truncated or corrupted (magic or checksum mismatch)")
        count, n_pages, streams = struct.unpack("<QQI", raw[8:28])
        crc = np.frombuffer(raw[28:-4], dtype=np.uint32)
        if streams != self.streams or crc.size != n_pages * streams or n_pages != ceil_div(count, self.P):
            raise KVFileError(f"page table {table!r} does not match its data file")
        return count, crc.reshape(n_pages, streams).copy()

    def flush(self) -> None:
        """Write the partial last page and the table (atomically), then fsync: the file is reopenable."""
        if self.read_only:
            return
        if self.count % self.P:
            self._write_pages(self.count // self.P, self.staging[:, None])
        body = TABLE_MAGIC + struct.pack("<QQI", self.count, self.crc.shape[0], self.streams) + self.crc.tobytes()
        tmp = self.path + ".table.tmp"
        with open(tmp, "wb") as f:
            f.write(body + struct.pack("<I", zlib.crc32(body)))
            f.flush()
            os.fsync(f.fileno())
        os.fsync(self._fd)
        os.replace(tmp, self.path + ".table")

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None

    # ------------------------------------------------------------------------------------------------ data
    def _write_pages(self, first_page: int, pages: torch.Tensor) -> None:
        """``pages [S, n, P, D]``: pages ``first_page ..`` of every stream, written as one contiguous run."""
        n = pages.shape[1]
        run = pages.transpose(0, 1).contiguous()                 # slot order: page-major, then stream
        raw = run.view(torch.int16 if self.dtype == torch.bfloat16 else self.dtype).numpy().view(np.uint8)
        os.pwrite(self._fd, raw.tobytes(), HEADER_BYTES + first_page * self.streams * self.page_bytes)
        rows = raw.reshape(n, self.streams, self.page_bytes)
        crc = np.array([[zlib.crc32(rows[i, s]) for s in range(self.streams)] for i in range(n)], dtype=np.uint32)
        if self.crc.shape[0] < first_page + n:
            self.crc = np.concatenate([self.crc, np.zeros((first_page + n - self.crc.shape[0], self.streams),
                                                          dtype=np.uint32)])
        self.crc[first_page:first_page + n] = crc
        for p in range(first_page, first_page + n):
            for s in range(self.streams):
                self.cache.drop(p * self.streams + s)

    def append(self, x: torch.Tensor) -> None:
        """``x [S, n, D]``: the next ``n`` tokens of every stream."""
        if self.read_only:
            raise KVFileError(f"{self.path!r} was opened read-only; cannot append")
        if x.dim() != 3 or x.shape[0] != self.streams or x.shape[2] != self.dim:
            raise InvalidArgumentError(f"x must be [{self.streams}, n, {self.dim}], got {tuple(x.shape)}")
        x = x.detach().to("cpu", self.dtype)
        fill = self.count % self.P
        if fill:
            take = min(self.P - fill, x.shape[1])
            self.staging[:, fill:fill + take] = x[:, :take]
            x, self.count = x[:, take:], self.count + take
            if self.count % self.P == 0:
                self._write_pages(self.count // self.P - 1, self.staging[:, None])
        full = x.shape[1] // self.P
        if full:
            self._write_pages(self.count // self.P, x[:, :full * self.P].reshape(self.streams, full, self.P, self.dim))
            self.count += full * self.P
        rest = x[:, full * self.P:]
        if rest.shape[1]:
            self.staging[:, :rest.shape[1]] = rest
            self.count += rest.shape[1]

    def _read_pages(self, page: int) -> torch.Tensor:
        """Page ``page`` of every stream as ``[S, P, D]``, checksums verified."""
        return torch.stack([self._read_slot(page * self.streams + s) for s in range(self.streams)])

    def _read_slot(self, slot: int) -> torch.Tensor:
        raw = os.pread(self._fd, self.page_bytes, HEADER_BYTES + slot * self.page_bytes)
        self.bytes_read += len(raw)
        page, stream = divmod(slot, self.streams)
        if len(raw) != self.page_bytes:
            raise KVFileError(f"{self.path!r} is truncated: page {page} of stream {stream} is short")
        if zlib.crc32(raw) != int(self.crc[page, stream]):
            raise KVFileError(f"{self.path!r} is corrupted: checksum mismatch in page {page} of stream {stream}")
        arr = np.frombuffer(raw, dtype=_NP_VIEW[self.dtype]).reshape(self.P, self.dim)
        t = torch.from_numpy(arr.copy())
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx [S, m]`` token positions (< count) per stream -> ``[S, m, D]`` vectors (reads only their pages)."""
        S, m = idx.shape
        page = idx // self.P
        slots = (page * S + torch.arange(S)[:, None]).flatten()
        uniq, inverse = torch.unique(slots, return_inverse=True)
        partial = self.count // self.P if self.count % self.P else -1
        pages = torch.empty(len(uniq), self.P, self.dim, dtype=self.dtype)
        for i, slot in enumerate(uniq.tolist()):
            p, s = divmod(slot, S)
            if p == partial:
                pages[i] = self.staging[s]
                continue
            cached = self.cache.get(slot)
            if cached is None:
                cached = self._read_slot(slot)
                self.cache.put(slot, cached)
            pages[i] = cached
        return pages[inverse, (idx % self.P).flatten()].view(S, m, self.dim)

    def read_all(self, run_bytes: int = 64 << 20, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every stored token, ``[S, count, D]`` (for rebuilding an index after a restart, or restoring a saved
        context), checksums verified; written into ``out`` (``[S, count, D]``, contiguous in its last two dims)
        when given.  Full pages are read in runs of about ``run_bytes`` (one ``pread`` each: consecutive pages are
        contiguous in the file), not page by page."""
        S, P, n_full = self.streams, self.P, self.count // self.P
        if out is None:
            out = torch.empty(S, self.count, self.dim, dtype=self.dtype)
        elif out.shape != (S, self.count, self.dim) or out.dtype != self.dtype:
            raise InvalidArgumentError(f"out must be [{S}, {self.count}, {self.dim}] {self.dtype}, "
                             f"got {tuple(out.shape)} {out.dtype}")
        step = max(1, run_bytes // (S * self.page_bytes))
        for first in range(0, n_full, step):
            n = min(step, n_full - first)
            out[:, first * P:(first + n) * P].view(S, n, P, self.dim).copy_(self._read_run(first, n).transpose(0, 1))
        if self.count % P:
            out[:, n_full * P:] = self.staging[:, :self.count % P]
        return out

    def _read_run(self, first_page: int, n: int) -> torch.Tensor:
        """Pages ``first_page .. first_page + n`` of every stream in one read, as ``[n, S, P, D]``, CRCs checked."""
        S, size = self.streams, n * self.streams * self.page_bytes
        buf = bytearray(size)
        got = os.preadv(self._fd, [buf], HEADER_BYTES + first_page * S * self.page_bytes)
        self.bytes_read += got
        if got != size:
            raise KVFileError(f"{self.path!r} is truncated: pages {first_page}..{first_page + n - 1} are short")
        view, crc = memoryview(buf), self.crc[first_page:first_page + n].reshape(-1)
        for i in range(n * S):
            if zlib.crc32(view[i * self.page_bytes:(i + 1) * self.page_bytes]) != int(crc[i]):
                page, stream = divmod(first_page * S + i, S)
                raise KVFileError(f"{self.path!r} is corrupted: checksum mismatch in page {page} of stream {stream}")
        pages = torch.from_numpy(np.frombuffer(buf, dtype=_NP_VIEW[self.dtype]).reshape(n, S, self.P, self.dim))
        if self.dtype == torch.bfloat16:
            pages = pages.view(torch.bfloat16)
        return pages

    def nbytes_disk(self) -> int:
        return HEADER_BYTES + self.crc.shape[0] * self.streams * self.page_bytes + self.crc.nbytes + 32

    def nbytes_ram(self) -> int:
        return self.cache.nbytes() + self.staging.numel() * self.staging.element_size() + self.crc.nbytes
