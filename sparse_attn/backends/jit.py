"""JIT build cache for the C++ and CUDA sources in ``csrc/`` (where they are, and their compiled artifacts): memo in the process, compiled artifacts on disk, a file lock.

Kept free of CuPy and CUDA so its logic is testable on any machine: the compile step (``compile_fn(source,
options, arch) -> bytes``) and the module load (``load_fn(path) -> module``) are passed in.

* Key: sha256 of the kernel file name, its source, the ``-D`` defines, the GPU arch and a toolchain string (CuPy and
  NVRTC versions); any change gives a new artifact, old ones are never overwritten.
* Disk: ``<directory>/<name>-<key>.bin``, written to a temporary file and renamed, so a reader never sees a partial
  artifact.  Directory: ``$SPARSE_ATTN_CACHE`` or ``~/.cache/sparse_attn``.
* Lock: ``fcntl.flock`` on ``<name>-<key>.lock`` around check-compile-write, so concurrent processes build an
  artifact once; the others wait, then load it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Mapping

CompileFn = Callable[[str, tuple, str], bytes]
LoadFn = Callable[[str], object]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_ATTN_CACHE") or Path.home() / ".cache" / "sparse_attn")


def define_options(defines: Mapping[str, object]) -> tuple:
    """``-DNAME=VALUE`` options in a canonical (sorted) order."""
    return tuple(f"-D{name}={value}" for name, value in sorted(defines.items()))


def cache_key(name: str, source: str, defines: Mapping[str, object], arch: str, toolchain: str) -> str:
    digest = hashlib.sha256()
    for part in (name, source, "\0".join(define_options(defines)), str(arch), toolchain):
        digest.update(part.encode())
        digest.update(b"\1")
    return digest.hexdigest()[:40]


class FileLock:
    """Exclusive ``flock`` on a lock file (no-op where fcntl is missing, e.g. Windows)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:
            return self
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)            # closing the descriptor releases the lock


class KernelCache:
    """Compiled modules by (source, specialisation): memo, then disk, then compile under the file lock."""

    def __init__(self, compile_fn: CompileFn, load_fn: LoadFn, directory: str | os.PathLike | None = None,
                 toolchain: str = ""):
        self.compile_fn, self.load_fn, self.toolchain = compile_fn, load_fn, toolchain
        self._directory = None if directory is None else Path(directory)
        self._memo: dict = {}
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        return self._directory if self._directory is not None else default_cache_dir()

    def artifact_path(self, name: str, source: str, defines: Mapping[str, object], arch: str) -> Path:
        key = cache_key(name, source, defines, arch, self.toolchain)
        return self.directory / f"{Path(name).stem}-{key}.bin"

    def load(self, name: str, source: str, defines: Mapping[str, object], arch: str, device: int = 0):
        """The module for ``source`` compiled with ``defines`` for ``arch`` (loaded once per device)."""
        path = self.artifact_path(name, source, defines, arch)
        memo_key = (str(path), device)
        with self._lock:
            module = self._memo.get(memo_key)
            if module is None:
                module = self.load_fn(str(self._ensure_artifact(path, source, defines, arch)))
                self._memo[memo_key] = module
        return module

    def _ensure_artifact(self, path: Path, source: str, defines, arch: str) -> Path:
        if _nonempty(path):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_suffix(".lock")):
            if _nonempty(path):                # another process built it while we waited
                return path
            binary = self.compile_fn(source, define_options(defines), arch)
            if not isinstance(binary, (bytes, bytearray)) or not binary:
                raise RuntimeError(f"compiling {path.name}: the compiler returned no binary")
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(binary)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        return path


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def source_dir() -> Path:
    """``csrc/`` next to the package (a source checkout) or inside it (an install that ships it as data)."""
    here = Path(__file__).resolve().parents[1]            # the sparse_attn package
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the kernel sources (csrc/) were not found next to or inside {here}")
