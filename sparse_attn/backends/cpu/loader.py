"""The compiled CPU backend: ``csrc/sparse_attention_cpu.cpp``, built with this machine's C++ compiler on first use
(about 15 s, once) and cached on disk.  Where it cannot be built (no compiler or ninja) ``backend="auto"`` takes the
torch backend instead, with one warning; ``SPARSE_ATTN_CPU_KERNEL=0`` turns it off.

The build targets this machine's CPU (``-march=native``), so the build directory's name hashes the source, the
flags, torch's version and the CPU's feature flags: a home directory shared by different machines never loads a
binary built for another CPU.  Directory: ``$SPARSE_ATTN_CACHE/cpu`` or ``~/.cache/sparse_attn/cpu``."""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

from ...layout import SparseLayout
from ..jit import default_cache_dir, source_dir

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


def build_name(source: bytes, flags=FLAGS, torch_version: str = torch.__version__, cpu: str | None = None) -> str:
    digest = hashlib.sha256()
    for part in (source, " ".join(flags).encode(), torch_version.encode(), (cpu or cpu_signature()).encode()):
        digest.update(part)
        digest.update(b"\0")
    return "sparse_attn_cpu_" + digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def load():
    """The kernel (``torch.ops.sparse_attn_cpu.sparse_attention``), or None where it is turned off or cannot be
    built here (a warning says why, once per process)."""
    if os.environ.get("SPARSE_ATTN_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as build

        source = source_path()
        name = build_name(source.read_bytes())
        directory = default_cache_dir() / "cpu" / name
        if not (directory / f"{name}.so").exists():
            print(f"sparse_attn: building the CPU kernel in {directory} (once per machine, about 15 s)",
                  file=sys.stderr)
        directory.mkdir(parents=True, exist_ok=True)
        build(name=name, sources=[str(source)], extra_cflags=list(FLAGS), extra_ldflags=["-fopenmp"],
              build_directory=str(directory), is_python_module=False, verbose=False)
        return torch.ops.sparse_attn_cpu.sparse_attention
    except Exception as err:  # no compiler, no ninja, a failed build: the torch backend still runs
        warnings.warn(f"sparse_attn: the compiled CPU kernel is unavailable ({type(err).__name__}: "
                      f"{str(err)[:500]}); backend='auto' uses the slower torch backend", RuntimeWarning, stacklevel=2)
        return None


def available() -> bool:
    return load() is not None


def supports(q) -> bool:
    """Inputs the kernel takes: CPU tensors of fp32, fp16 or bf16 (fp64 stays in the torch backend, in fp64)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)


def cpu_kernel_attention(q, k, v, layout: SparseLayout, *, causal: bool, scale: float, return_lse: bool = False):
    """`backends.torch.attention.torch_sparse_attention`'s contract (inputs checked by `prefill.sparse_attention`) through the
    compiled kernel: computes in fp32 and returns the output in q's dtype, the LSE [B, Hq, Lq] in fp32."""
    op = load()
    if op is None:
        raise RuntimeError("backend='cpu': the compiled CPU kernel is unavailable on this machine (see the warning "
                           "above); use backend='torch'")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    qf, vf = q.to(torch.float32).contiguous(), v.to(torch.float32).contiguous()
    # keys transposed (the kernel reads a tile's keys as a [D, width] block in place), rows padded to an odd
    # multiple of 16 floats: with a power-of-two row stride the D rows of one tile fall on the same cache sets
    ldk = (Lk // 16 + 1 + (Lk // 16) % 2) * 16
    k_t = q.new_empty(B, Hkv, D, ldk, dtype=torch.float32)
    k_t[..., :Lk] = k.transpose(-1, -2)
    counts = layout.block_count.to(torch.int32).contiguous()
    col_counts = layout.column_count.to(torch.int32).contiguous()
    # a tile holds at most min(block_n, Lk) keys: a block_n far above Lk must not size the score buffer
    max_keys = int((counts.long() * min(layout.block_n, Lk) + col_counts).max()) if counts.numel() else 0
    out, lse = op(qf, k_t, vf, layout.block_offset.to(torch.int32).contiguous(), counts,
                  layout.column_index.to(torch.int32).contiguous(), col_counts, layout.block_m, layout.block_n,
                  causal, float(scale), max_keys)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
