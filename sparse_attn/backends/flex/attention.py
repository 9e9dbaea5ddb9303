"""Run a block-aligned SparseLayout through PyTorch FlexAttention, compiled (CPU or GPU).

On the CPU, compiled FlexAttention beats the torch backend on aligned, column-free layouts (BlockSparse, aligned
A-shape): measured 567 vs 883 ms at 16K and 1356 vs 1926 ms at 32K (bench/results).  Each new shape costs a
compile (1.6 to 13 s measured), so `backend="flex"` is explicit rather than chosen by "auto"."""
from __future__ import annotations

import functools

import torch

from ...layout import SparseLayout
from ...errors import InvalidArgumentError


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def kernel_options(layout: SparseLayout, device) -> dict | None:
    """Tile sizes for the compiled GPU kernel that divide the layout's blocks: its defaults (128 query rows on
    Hopper) must divide the BlockMask's block size, which is the layout's (64 by default).  None on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    return {"BLOCK_M": gpu_tile(layout.block_m), "BLOCK_N": gpu_tile(layout.block_n)}


def gpu_tile(block: int) -> int:
    """The largest power of two dividing ``block``, at most 128 (the GPU kernel needs at least 16)."""
    return min(block & -block, 128)


def flex_sparse_attention(q, k, v, layout: SparseLayout, *, causal: bool, scale: float, return_lse: bool = False):
    """Same contract as `backends.torch.attention.torch_sparse_attention`; the layout must be block-aligned without columns
    (`SparseLayout.to_flex_block_mask` raises otherwise)."""
    if return_lse and q.device.type == "cpu":
        raise InvalidArgumentError("return_lse: backend='flex' cannot return the LSE on the CPU (compiled CPU FlexAttention "
                         "does not support it); use backend='torch'")
    block_mask = layout.to_flex_block_mask(causal=causal)
    out = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                           return_lse=return_lse, kernel_options=kernel_options(layout, q.device))
    if not return_lse:
        return out
    out, lse = out
    return out, lse.float()
