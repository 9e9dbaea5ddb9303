"""A saved index: ``layer<L>.index`` next to the cache's page files, so a reopened cache searches exactly as before.

File = magic ``SPATTNIX``, format version, payload length and zlib.crc32 of the payload (``<4sIQI`` after the
magic), then the payload: ``torch.save`` of ``{"name", "params", "state"}`` (tensors, numbers, strings; faiss
indexes as ``faiss.serialize_index`` bytes in uint8 tensors).  ``name`` and ``params`` rebuild the index object
(:func:`index_from_saved`), ``state`` is its ``state_dict()``.  A short file or a checksum mismatch raises
:class:`~.page_file.KVFileError` naming the file."""
from __future__ import annotations

import io
import os
import struct
import zlib

import torch

from .page_file import KVFileError

MAGIC, VERSION = b"SPATTNIX", 1
_HEAD = struct.Struct("<IQI")                       # version, payload bytes, crc32 of the payload


def index_from_saved(name: str, params: dict):
    """A new, empty index of kind ``name`` built with the saved constructor ``params``."""
    from .index_exact import ExactIndex
    if name == "exact":
        return ExactIndex()
    if name == "ivf":
        from .index_ivf import IVFIndex as cls
    elif name == "query_aware":
        from .index_query_aware import QueryAwareIndex as cls
    elif name == "fast":
        from .index_fast import FastScanIndex as cls
    else:
        raise KVFileError(f"saved index kind {name!r} is unknown to this version")
    return cls(**params)


def save_index(path, index) -> None:
    """Write ``index`` (name, constructor params, state) to ``path`` atomically, with a checksum."""
    buf = io.BytesIO()
    state = index.state_dict() if hasattr(index, "state_dict") else {}
    torch.save({"name": index.name, "params": getattr(index, "params", {}), "state": state}, buf)
    payload = buf.getvalue()
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + _HEAD.pack(VERSION, len(payload), zlib.crc32(payload)) + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_index(path):
    """The index saved at ``path``, with its state restored (attach it to the key tier afterwards)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise KVFileError(f"cannot read saved index {path!r}: {err.strerror}") from None
    start = len(MAGIC) + _HEAD.size
    if len(raw) < start or raw[:len(MAGIC)] != MAGIC:
        raise KVFileError(f"{path!r} is not a saved sparse_attn index (bad magic or truncated)")
    version, length, crc = _HEAD.unpack(raw[len(MAGIC):start])
    payload = raw[start:]
    if version != VERSION or len(payload) != length or zlib.crc32(payload) != crc:
        raise KVFileError(f"saved index {path!r} is truncated, corrupted (checksum mismatch) or of another version")
    saved = torch.load(io.BytesIO(payload), weights_only=True)
    index = index_from_saved(saved["name"], saved["params"])
    if saved["state"]:
        index.load_state_dict(saved["state"])
    return index
