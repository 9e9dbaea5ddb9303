"""Small JSON files with a checksum, written atomically: the metadata of the SSD tier, saved contexts and their
catalogue.  File = ``{"meta": ..., "crc32": zlib.crc32 of the meta's sorted-key JSON}``; a file that is missing,
cut short, edited or corrupted raises :class:`~.page_file.KVFileError` naming it."""
from __future__ import annotations

import json
import os
import zlib

from .page_file import KVFileError


def _crc(meta) -> int:
    return zlib.crc32(json.dumps(meta, sort_keys=True).encode())


def write_checked_json(path, meta) -> None:
    """Write ``meta`` (JSON-serialisable) to ``path`` through a temporary file, fsync'd, then renamed over it."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "crc32": _crc(meta)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checked_json(path, what: str = "metadata"):
    """The ``meta`` written by :func:`write_checked_json`; ``what`` names the file in errors."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            raw = json.load(f)
        meta, crc = raw["meta"], raw["crc32"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KVFileError(f"cannot read {what} {path!r}: {err}") from None
    if _crc(meta) != crc:
        raise KVFileError(f"{what} {path!r} is corrupted (checksum mismatch)")
    return meta
