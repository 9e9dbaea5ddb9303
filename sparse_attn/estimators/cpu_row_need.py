"""The compiled CPU count behind Auto's early dense routing (``csrc/row_need_cpu.cpp``): for each of the last query
rows, the keys (among every ``key_stride``-th) it needs for ``gamma`` of its softmax mass, counted with
`mass_count.keys_for_mass`'s histogram, in one call instead of a dozen torch ops over ``[B, Hq, n, Lk / stride]``.
Its readable reference is `patterns.auto._row_keys_torch`, which also runs on other devices and where this cannot
be built.  Built on first use through the CPU kernel's loader (same JIT cache, checksum, file lock and
``SPARSE_ATTN_CPU_KERNEL=0`` off switch); where it cannot be built, one warning and the torch path runs."""
from __future__ import annotations

import functools

import torch

from ..backends.cpu import loader
from .mass_count import BUCKETS_PER_NAT, N_BUCKETS

SOURCE_NAME = "row_need_cpu.cpp"
_TYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def load():
    """``torch.ops.sparse_attn_cpu_row_need``, or None (turned off, or no compiler here: one warning)."""
    return loader.load_library(SOURCE_NAME, "sparse_attn_cpu_row_need", "the compiled row-need count",
                               "the torch row-need count")


def takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the compiled count runs these inputs: CPU tensors of fp32, bf16 or fp16, and it is built here."""
    return (q.device.type == "cpu" and k.device.type == "cpu" and q.dtype in _TYPES and k.dtype in _TYPES
            and load() is not None)


def cpu_row_need(q, k, n: int, scale: float, causal: bool, *, heads, key_stride: int, gamma: float):
    """For the last ``n`` query rows of the query heads ``heads`` (long ``[Hs]``): ``[B, Hs, n]`` fp32, the keys
    each row needs among every ``key_stride``-th key for ``gamma`` of its mass (`auto._row_keys_torch`'s
    contract), and ``[B, Hs]`` fp32, the largest share of its visible keys a row of the head needs
    (`auto._row_need`'s).  Scored in fp32, as the torch path does: bf16 GEMMs were tried and gained little here
    (rounding the fp32 keys cost most of what the GEMM saved; best of 25 calls, 2 cores, text workload, B=1, 8 / 2
    heads, D=128: bf16 0.59 vs fp32 0.58 ms at 32K, 1.10 vs 1.17 ms at 64K) while moving the counts (a head's
    share by up to 0.006 on the audit workloads), so the counts stay the torch path's."""
    keys = k[:, :, ::key_stride]                          # a view: the op reads rows at any row stride
    if keys.stride(-1) != 1:
        keys = keys.contiguous()                          # a copy of the scored keys only
    needed, share = load().row_need(q, keys, heads.to(torch.long), n, float(scale), key_stride, k.shape[2],
                                    bool(causal), float(gamma), BUCKETS_PER_NAT, N_BUCKETS)
    return needed, share
