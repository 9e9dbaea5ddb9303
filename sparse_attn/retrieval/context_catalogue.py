"""An on-disk catalogue of saved contexts under one root directory: longest-prefix lookup by token ids, and
eviction of the least recently used contexts once their total size passes a bound.

``<root>/catalogue.json`` (checksummed, rewritten atomically under ``<root>/catalogue.lock``) lists each context
directory ``<root>/<name>`` with its model key (:func:`~.saved_context.identity_key`), token count, size, last use,
and chained hashes of its token ids: one per full block of ``block_tokens`` tokens (hash i covers tokens
``[0, (i + 1) * block_tokens)``) and one of all its tokens.  A lookup hashes the request's ids once and finds, among
contexts of the same model, the one sharing the longest prefix with it (whole blocks, or the whole context).  The
hashes only locate a candidate: restoring compares the token ids themselves."""
from __future__ import annotations

import hashlib
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends.jit import FileLock
from ..errors import InvalidArgumentError
from .checked_json import read_checked_json, write_checked_json
from .saved_context import CONTEXT_FILE, directory_bytes, token_list

CATALOGUE_FILE = "catalogue.json"


def prefix_hashes(ids, block_tokens: int, upto: int | None = None) -> list:
    """Chained hashes of the full blocks of ``ids[:upto]``: entry i covers ``ids[:(i + 1) * block_tokens]``."""
    arr = np.asarray(ids[:upto] if upto is not None else ids, dtype="<i8")
    out, h = [], b""
    for start in range(0, len(arr) - block_tokens + 1, block_tokens):
        h = hashlib.sha256(h + arr[start:start + block_tokens].tobytes()).digest()
        out.append(h)
    return out


def _hash_of_prefix(ids, n: int, blocks: list, block_tokens: int) -> str:
    """Hash of ``ids[:n]``: the chain over its full blocks (``blocks``, the request's), then its partial tail."""
    full = n // block_tokens
    h = blocks[full - 1] if full else b""
    if n % block_tokens:
        h = hashlib.sha256(h + np.asarray(ids[full * block_tokens:n], dtype="<i8").tobytes()).digest()
    return h.hex()


@dataclass(frozen=True)
class CatalogueMatch:
    """A saved context sharing ``tokens`` leading tokens with a request (``saved_tokens`` in all)."""

    name: str
    directory: str
    tokens: int
    saved_tokens: int


class ContextCatalogue:
    """Saved contexts under ``root``; ``max_bytes``: total size kept (None: no bound); ``block_tokens``: the
    granularity of partial-prefix matches (a whole saved context matches at any length)."""

    def __init__(self, root, *, max_bytes: int | None = None, block_tokens: int = 256):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise InvalidArgumentError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise InvalidArgumentError(f"block_tokens must be a positive int, got {block_tokens!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.block_tokens = max_bytes, block_tokens
        self._path, self._lock = self.root / CATALOGUE_FILE, self.root / "catalogue.lock"

    # ------------------------------------------------------------------------------------------ state
    def _load(self) -> dict:
        if not self._path.exists():
            return {"block_tokens": self.block_tokens, "clock": 0, "entries": {}}
        state = read_checked_json(self._path, "context catalogue")
        if state["block_tokens"] != self.block_tokens:
            raise InvalidArgumentError(f"block_tokens: the catalogue in {str(self.root)!r} uses "
                                       f"{state['block_tokens']}, got {self.block_tokens}")
        return state

    def _store(self, state: dict) -> None:
        write_checked_json(self._path, state)

    def entries(self) -> dict:
        """name -> entry (``model``, ``tokens``, ``bytes``, ``last_used``, ``blocks``, ``full``)."""
        with FileLock(self._lock):
            return self._load()["entries"]

    def total_bytes(self) -> int:
        return sum(e["bytes"] for e in self.entries().values())

    # ------------------------------------------------------------------------------------------ use
    def new_directory(self) -> str:
        """A fresh directory under the root for the next context to save (then :meth:`add` it)."""
        path = self.root / f"ctx-{uuid.uuid4().hex[:16]}"
        path.mkdir()
        return str(path)

    def add(self, directory, token_ids, model_key: str) -> list:
        """Register the context saved in ``directory`` (a directory under the root) for ``token_ids`` of the model
        ``model_key``; then evict least recently used contexts (the new one last) until the total size fits
        ``max_bytes``.  Returns the evicted names (the new one among them if it alone is larger)."""
        directory = Path(directory)
        if directory.parent.resolve() != self.root.resolve() or not (directory / CONTEXT_FILE).exists():
            raise InvalidArgumentError(f"directory must be a saved context directly under {str(self.root)!r} "
                                       f"(see new_directory), got {str(directory)!r}")
        ids = token_list(token_ids)
        blocks = prefix_hashes(ids, self.block_tokens)
        with FileLock(self._lock):
            state = self._load()
            state["clock"] += 1
            state["entries"][directory.name] = {
                "model": model_key, "tokens": len(ids), "bytes": directory_bytes(directory),
                "last_used": state["clock"], "blocks": [b.hex() for b in blocks],
                "full": _hash_of_prefix(ids, len(ids), blocks, self.block_tokens)}
            evicted = self._evict(state, keep=directory.name)
            self._store(state)
        return evicted

    def _evict(self, state: dict, keep: str) -> list:
        entries, evicted = state["entries"], []
        for name in [n for n in entries if not (self.root / n / CONTEXT_FILE).exists()]:
            del entries[name]                                    # removed by hand: forget it
        while self.max_bytes is not None and entries and sum(e["bytes"] for e in entries.values()) > self.max_bytes:
            name = min(entries, key=lambda n: (n == keep, entries[n]["last_used"]))
            shutil.rmtree(self.root / name, ignore_errors=True)
            del entries[name]
            evicted.append(name)
        return evicted

    def lookup(self, token_ids, model_key: str) -> CatalogueMatch | None:
        """The context of model ``model_key`` sharing the longest prefix with ``token_ids`` (ties: the most
        recently used), or None.  A hit counts as a use (for eviction)."""
        ids = token_list(token_ids)
        request = prefix_hashes(ids, self.block_tokens)
        with FileLock(self._lock):
            state = self._load()
            best = None
            for name, e in state["entries"].items():
                if e["model"] != model_key or not (self.root / name / CONTEXT_FILE).exists():
                    continue
                common = 0
                while common < min(len(e["blocks"]), len(request)) and e["blocks"][common] == request[common].hex():
                    common += 1
                tokens = common * self.block_tokens
                if (common == len(e["blocks"]) and e["tokens"] <= len(ids)
                        and _hash_of_prefix(ids, e["tokens"], request, self.block_tokens) == e["full"]):
                    tokens = e["tokens"]
                if tokens and (best is None or (tokens, e["last_used"]) > (best[1], best[2])):
                    best = (name, tokens, e["last_used"])
            if best is None:
                return None
            state["clock"] += 1
            state["entries"][best[0]]["last_used"] = state["clock"]
            self._store(state)
            entry = state["entries"][best[0]]
        return CatalogueMatch(best[0], str(self.root / best[0]), best[1], entry["tokens"])

    def remove(self, name: str) -> None:
        """Delete the context ``name`` and its entry."""
        with FileLock(self._lock):
            state = self._load()
            if state["entries"].pop(name, None) is not None:
                shutil.rmtree(self.root / name, ignore_errors=True)
                self._store(state)
