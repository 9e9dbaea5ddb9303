"""The vertical-slash layout on the CPU (``csrc/vertical_slash_layout_cpu.cpp``): `VerticalSlash.build`'s work after
the sample scores (`vertical_slash._choose`, the slot compaction, the key ranges and `base.layout_from_ranges`) in
one compiled call, parallel over (batch row, head).  Its result is the torch path's, tensor for tensor; the torch
path stays the readable reference and runs on other devices.  Built on first use through the CPU kernel's loader
(same JIT cache, checksum, file lock and ``SPARSE_ATTN_CPU_KERNEL=0`` off switch); where it cannot be built, one
warning and the torch path runs."""
from __future__ import annotations

import functools

import torch

from ..backends.cpu import loader
from ..estimators.sample_mass import GroupedScores
from ..layout import SparseLayout

SOURCE_NAME = "vertical_slash_layout_cpu.cpp"


@functools.lru_cache(maxsize=1)
def load():
    """``torch.ops.sparse_attn_cpu_vs_layout``, or None (turned off, or no compiler here: one warning)."""
    return loader.load_library(SOURCE_NAME, "sparse_attn_cpu_vs_layout", "the compiled vertical-slash layout",
                               "the torch layout ops")


def takes(sample, device, n: int, block_n: int) -> bool:
    """Whether the compiled call can build this layout: CPU tensors, a sample carrying its column mass split by
    diagonal group (`GroupedScores`, the CPU and torch scorers' result) in groups of ``block_n``, and built here."""
    return (torch.device(device).type == "cpu" and n > 0 and isinstance(sample, GroupedScores)
            and sample.group == block_n and load() is not None)


def vertical_slash_layout(sample: GroupedScores, group_mass, prm, *, gamma_mode: bool, causal: bool, q_len: int,
                          block_m: int, block_n: int, width_v: int, width_s: int,
                          tiles_per_group: int) -> SparseLayout:
    """The layout `VerticalSlash.build` makes from ``sample`` on the torch path: ``group_mass [B, h, nB]`` the
    diagonal mass per group (`vertical_slash.group_mass`), ``prm`` its per-head budgets (``slash`` and ``min_slash``
    in groups, ``target`` = gamma x sample rows)."""
    budgets = torch.stack([prm[name] for name in ("sink", "local", "vertical", "min_vertical", "slash",
                                                  "min_slash")]).contiguous()
    f32 = (lambda t: t.to(torch.float32).contiguous())
    count, offsets, col_count, col_index = load().vertical_slash_layout(
        f32(sample.column), f32(sample.column_off_local), f32(group_mass), f32(sample.by_group), budgets,
        f32(prm["target"]), int(sample.pos0), bool(gamma_mode), bool(causal), int(q_len), int(block_m),
        int(block_n), int(width_v), int(width_s), int(tiles_per_group))
    k_len = sample.column.shape[-1]
    return SparseLayout(count, offsets, col_count, col_index, q_len=q_len, k_len=k_len, block_m=block_m,
                        block_n=block_n)


def key_counts(layout: SparseLayout, causal: bool):
    """`SparseLayout.key_counts` in one compiled pass over a CPU layout (the same integers), or None where the
    compiled call cannot run (other devices, not built here)."""
    if layout.device.type != "cpu" or load() is None:
        return None
    limit = layout._block_key_limit(causal).contiguous()
    return load().key_counts(layout.block_offset.contiguous(), layout.block_count.contiguous(),
                             layout.column_index.contiguous(), layout.column_count.contiguous(), limit,
                             layout.block_n)
