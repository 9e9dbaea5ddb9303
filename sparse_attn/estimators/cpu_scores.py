"""The fused CPU pass for the sample scores (``csrc/sample_scores_cpu.cpp``): the contract of
`sample_mass.torch_sample_scores` (its readable reference) without the [heads, last_q, Lk] probabilities.  Built
on first use through the CPU kernel's loader (same JIT cache, checksum, file lock and ``SPARSE_ATTN_CPU_KERNEL=0``
off switch); where it cannot be built, one warning and the torch reference runs instead."""
from __future__ import annotations

import functools

import torch

from ..backends.cpu import loader
from .sample_mass import GroupedScores

SOURCE_NAME = "sample_scores_cpu.cpp"


@functools.lru_cache(maxsize=1)
def load():
    """``torch.ops.sparse_attn_cpu_scores``, or None (turned off, or no compiler here: one warning)."""
    return loader.load_library(SOURCE_NAME, "sparse_attn_cpu_scores", "the fused CPU score pass",
                               "the torch sample scores")


def available() -> bool:
    return load() is not None


def low_precision(q: torch.Tensor) -> bool:
    """Whether `cpu_rows_kept_mass`'s GEMMs run in bf16 (fp32 accumulation and softmax): for any input dtype, where
    this CPU has native bf16 GEMMs (fp32 keys rounded a chunk at a time in the pass).  With the one-pass check
    (32K, 8 heads, 32 rows, D=128, 2 cores) bf16 took 8.0-10.8 ms where fp32 took 12.2-15.7 ms, and the kept mass
    moved by at most 0.00044 (Auto's tolerance: 0.01).  Elsewhere fp32 (correct on any CPU)."""
    return native_bf16(q)


def native_bf16(q: torch.Tensor) -> bool:
    """Whether this CPU has native bf16 GEMMs for q's head dim (``SPARSE_ATTN_CPU_LOW_PRECISION=0``: no)."""
    return q.shape[-1] % 2 == 0 and loader.native_low_precision(torch.bfloat16, q.shape[-1])


def sample_low_precision(q: torch.Tensor) -> bool:
    """Whether `cpu_sample_scores`' GEMMs run in bf16 (fp32 accumulation and softmax): for any input dtype, where
    this CPU has native bf16 GEMMs; fp32 keys are converted a chunk at a time inside the pass.  Measured at 32K
    (8 heads, 64 rows, D=128, 2 cores): 12.8 ms vs 20-25 ms in fp32.  Elsewhere fp32 (correct on any CPU)."""
    return native_bf16(q)


def cpu_sample_scores(q, k, last_q: int, scale: float, causal: bool = True, *, heads, sink, local, group: int,
                      bf16: bool | None = None) -> GroupedScores:
    """`torch_sample_scores`'s contract on the fused pass.  ``bf16``: GEMMs in bf16 (default
    `sample_low_precision`); q is scaled in fp32 before the cast, fp32 keys are rounded to bf16 in the pass."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    n = min(last_q, Lq)
    dtype = torch.bfloat16 if (sample_low_precision(q) if bf16 is None else bf16) else torch.float32
    sample = (q[:, :, Lq - n:].index_select(1, heads).float() * scale).to(dtype).contiguous()
    usable = k.dtype == dtype or (k.dtype == torch.float32 and dtype == torch.bfloat16)
    keys = k if usable and k.stride(-1) == 1 else k.to(dtype).contiguous()
    as_long = (lambda t: t.to(torch.long).contiguous())
    column, off, diag, by_group, lse = load().sample_scores(sample, keys, as_long(heads // (Hq // Hkv)),
                                                            as_long(sink), as_long(local), Lk - n, bool(causal),
                                                            int(group))
    return GroupedScores(column, off, diag, by_group, lse, Lk - n, group)


def cpu_rows_kept_mass(q, k, rows, scale: float, causal: bool = True, *, heads, layout,
                       native: bool = True) -> torch.Tensor:
    """`row_sample.rows_kept_mass`'s contract on the fused one-pass check (no [heads, rows, Lk] tensor; bf16 GEMMs
    where the CPU has them, see `low_precision`, else fp32).  ``native=False`` takes the portable loops instead of
    the AVX-512 / AVX512_BF16 code the build has for this CPU (for tests: both give the same mass within 1e-5)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dtype = torch.bfloat16 if low_precision(q) else torch.float32
    # rows first: selecting the heads first would copy all of q
    sample = (q.index_select(2, rows).index_select(1, heads).float() * scale).to(dtype).contiguous()
    usable = k.dtype == dtype or (k.dtype == torch.float32 and dtype == torch.bfloat16)
    keys = k if usable and k.stride(-1) == 1 else k.to(dtype).contiguous()
    as_long = (lambda t: t.to(torch.long).contiguous())
    return load().rows_kept_mass(sample, keys, as_long(heads // (Hq // Hkv)), as_long(rows + (Lk - Lq)),
                                 as_long(rows // layout.block_m), bool(causal), layout.block_offset.contiguous(),
                                 layout.block_count.contiguous(), layout.column_index.contiguous(),
                                 layout.column_count.contiguous(), layout.block_n, bool(native))
