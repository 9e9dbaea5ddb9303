"""The compiled CPU backend: ``csrc/sparse_attention_cpu.cpp``, built with this machine's C++ compiler on first use
(about 15 s, once) and cached on disk.  Where it cannot be built (no compiler or ninja) ``backend="auto"`` takes the
torch backend instead, with one warning; ``SPARSE_ATTN_CPU_KERNEL=0`` turns it off.

The build targets this machine's CPU (``-march=native``), so the build directory's name hashes the source, the
flags, torch's version and the CPU's feature flags: a home directory shared by different machines never loads a
binary built for another CPU.  Directory: ``$SPARSE_ATTN_CACHE/cpu`` or ``~/.cache/sparse_attn/cpu``.  A build
records the library's sha256 beside it; a library that does not match (an interrupted build, a full disk) is
rebuilt, never loaded, under a file lock shared by concurrent processes."""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

from ...layout import SparseLayout
from ..jit import FileLock, default_cache_dir, source_dir
from ...errors import InvalidArgumentError

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-strict-aliasing")
SOURCE_NAME = "sparse_attention_cpu.cpp"


def source_path() -> Path:
    return source_dir() / SOURCE_NAME


def cpu_signature() -> str:
    """The CPU's feature flags (Linux), else the processor name: part of the build's identity."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_name(source: bytes, flags=FLAGS, torch_version: str = torch.__version__, cpu: str | None = None,
               prefix: str = "sparse_attn_cpu") -> str:
    digest = hashlib.sha256()
    for part in (source, " ".join(flags).encode(), torch_version.encode(), (cpu or cpu_signature()).encode()):
        digest.update(part)
        digest.update(b"\0")
    return f"{prefix}_" + digest.hexdigest()[:16]


def source_with_headers(source: Path) -> bytes:
    """The source and the ``csrc/`` headers it may include: a change to either is a new build."""
    return source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))


def checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified(library: Path) -> bool:
    """Whether ``library`` is the file its build recorded (the checksum written after a successful build)."""
    try:
        return checksum_path(library).read_text().strip() == file_sha256(library)
    except OSError:
        return False


def record_checksum(library: Path) -> None:
    """Written once the build succeeded, through a temporary file and a rename (a reader never sees half of it)."""
    target = checksum_path(library)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    tmp.write_text(file_sha256(library) + "\n")
    os.replace(tmp, target)


def _build_or_reuse(directory: Path, name: str, source: Path) -> None:
    """Load the cached library if its checksum matches; else (first use, an interrupted build, a truncated or
    altered file) build it afresh in an empty directory and record its checksum.  A damaged library is never
    loaded: mapping a truncated .so kills the process with a bus error."""
    from torch.utils.cpp_extension import load as build

    library = directory / f"{name}.so"
    with FileLock(directory.parent / f"{name}.lock"):      # one builder; the others wait, then verify
        if library.exists() and verified(library):
            torch.ops.load_library(str(library))
            return
        if directory.exists():
            if library.exists():
                warnings.warn(f"sparse_attn: the cached CPU kernel {library} does not match its recorded checksum "
                              "(an interrupted build or a damaged file); rebuilding it", RuntimeWarning, stacklevel=3)
            shutil.rmtree(directory)
        print(f"sparse_attn: building {source.name} in {directory} (once per machine, about 15 s)", file=sys.stderr)
        directory.mkdir(parents=True)
        build(name=name, sources=[str(source)], extra_cflags=list(FLAGS), extra_ldflags=["-fopenmp"],
              build_directory=str(directory), is_python_module=False, verbose=False)
        record_checksum(library)


@functools.lru_cache(maxsize=1)
def load():
    """The kernel's ops (``torch.ops.sparse_attn_cpu``), or None where it is turned off or cannot be built here
    (a warning says why, once per process)."""
    return load_library(SOURCE_NAME, "sparse_attn_cpu", "the compiled CPU kernel", "the slower torch backend")


def load_library(source_name: str, prefix: str, what: str, fallback: str):
    """Build (or reuse) ``csrc/<source_name>`` and return its ops namespace ``torch.ops.<prefix>``; None where
    ``SPARSE_ATTN_CPU_KERNEL=0`` or it cannot be built here (one warning naming ``what`` and the ``fallback``)."""
    if os.environ.get("SPARSE_ATTN_CPU_KERNEL", "1") == "0":
        return None
    try:
        source = source_dir() / source_name
        name = build_name(source_with_headers(source), prefix=prefix)
        directory = default_cache_dir() / "cpu" / name
        directory.parent.mkdir(parents=True, exist_ok=True)
        _build_or_reuse(directory, name, source)
        return getattr(torch.ops, prefix)
    except Exception as err:  # no compiler, no ninja, a failed build: the torch path still runs
        warnings.warn(f"sparse_attn: {what} is unavailable ({type(err).__name__}: {str(err)[:500]}); "
                      f"backend='auto' uses {fallback}", RuntimeWarning, stacklevel=3)
        return None


def available() -> bool:
    return load() is not None


def supports(q) -> bool:
    """Inputs the kernel takes: CPU tensors of fp32, fp16 or bf16 (fp64 stays in the torch backend, in fp64)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)


def native_low_precision(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether bf16/fp16 inputs run on this CPU's low-precision GEMMs (no fp32 copies); else they are computed in
    fp32.  ``SPARSE_ATTN_CPU_LOW_PRECISION=0`` forces the fp32 route."""
    return (dtype in (torch.float16, torch.bfloat16) and head_dim % 2 == 0
            and os.environ.get("SPARSE_ATTN_CPU_LOW_PRECISION", "1") != "0" and _low_precision_gemm(dtype))


@functools.lru_cache(maxsize=None)
def _low_precision_gemm(dtype: torch.dtype) -> bool:
    ops = load()
    return ops is not None and bool(ops.low_precision_gemm(dtype))


def key_row_stride(k_len: int) -> int:
    """Row length of the transposed keys: above k_len, a multiple of 16 elements, an odd number of 16s (with a
    power-of-two row stride the D rows of one tile fall on the same cache sets)."""
    return (k_len // 16 + 1 + (k_len // 16) % 2) * 16


def transposed_keys(k):
    """``k [B, Hkv, Lk, D]`` as the GEMM reads it: fp32 ``[B, Hkv, D, ldk]``, bf16/fp16 in the VNNI layout
    ``[B, Hkv, D / 2, ldk, 2]`` (key pairs' elements side by side), zeros past Lk."""
    B, H, L, D = k.shape
    ldk = key_row_stride(L)
    if k.dtype == torch.float32:
        k_t = k.new_empty(B, H, D, ldk)
        k_t[..., :L] = k.transpose(-1, -2)
        return k_t
    k_t = k.new_empty(B, H, D // 2, ldk, 2)
    k_t[..., :L, :] = k.unflatten(-1, (D // 2, 2)).transpose(2, 3)
    k_t[..., L:, :] = 0
    return k_t


def vnni_values(v, ldk: int):
    """``v [B, Hkv, Lk, D]`` as ``[B, Hkv, ldk / 2, D, 2]``: the two keys of a pair side by side, zeros past Lk."""
    B, H, L, D = v.shape
    out = v.new_zeros(B, H, ldk // 2, D, 2)
    pairs = out.transpose(-1, -2)                       # [B, H, ldk / 2, 2, D] view
    even = L - L % 2
    pairs[:, :, :even // 2] = v[:, :, :even].unflatten(2, (even // 2, 2))
    if L % 2:
        pairs[:, :, L // 2, 0] = v[:, :, L - 1]
    return out


#: Keys a query block scores at once; blocks that see more take them in segments with an online softmax (flash
#: attention's recurrence), so their scores stay in L2.  Measured on a dense causal layout at 16K (2 cores, D=128):
#: see bench/results/cpu-kernel-segments-2core-2026-12-04-s8.txt.
SEGMENT_KEYS = 1024


def _rows(t):
    """The tensor itself where its last dimension is contiguous (the kernel takes any other strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cpu_kernel_attention(q, k, v, layout: SparseLayout, *, causal: bool, scale: float, return_lse: bool = False,
                         softcap: float = 0.0, out=None):
    """`backends.torch.attention.torch_sparse_attention`'s contract (inputs checked by `prefill.sparse_attention`) through the
    compiled kernel.  fp32 in fp32; bf16/fp16 on the CPU's low-precision GEMMs where it has them (fp32
    accumulation and softmax, probabilities rounded to the input type before the value GEMM), else in fp32.
    ``softcap > 0`` caps the scaled scores: ``softcap * tanh(s / softcap)`` before mask and softmax (0: off).
    ``out`` (optional, checked by the caller): q's shape and dtype, last dimension contiguous; the kernel writes
    into it (where it computes in q's dtype) instead of allocating the result.
    Returns the output in q's dtype (``out`` when given), and with ``return_lse`` the LSE [B, Hq, Lq] in fp32."""
    ops = load()
    if ops is None:
        raise RuntimeError("backend='cpu': the compiled CPU kernel is unavailable on this machine (see the warning "
                           "above); use backend='torch'")
    softcap = float(softcap)
    if not softcap >= 0.0 or softcap == float("inf"):
        raise InvalidArgumentError(f"softcap must be a finite number >= 0 (0 turns it off), got {softcap}")
    dtype = q.dtype
    if dtype != torch.float32 and not native_low_precision(dtype, q.shape[-1]):
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = _rows(q), _rows(k), _rows(v)
    k_t = transposed_keys(k)
    v_in = v if q.dtype == torch.float32 else vnni_values(v, k_t.shape[3])
    in_place = out is not None and q.dtype == dtype           # else (computed in fp32) the result is copied in
    result, lse = ops.sparse_attention(q, k, k_t, v_in, layout.block_offset.contiguous(),
                                       layout.block_count.contiguous(), layout.column_index.contiguous(),
                                       layout.column_count.contiguous(), layout.block_m, layout.block_n, causal,
                                       float(scale), softcap, SEGMENT_KEYS, out if in_place else None)
    if out is None:
        out = result.to(dtype)
    elif not in_place:
        out.copy_(result)
    return (out, lse) if return_lse else out
