"""Read one request's keys and values out of vLLM's CPU_ATTN paged KV cache, as BHLD tensors for our API.

The cache of a layer is ``kv_cache [num_blocks, Hkv, block_size, 2 * D]``; per (block, KV head) the first
``block_size * D`` elements hold the keys and the rest the values.  How the keys sit inside that space depends on
the ISA the CPU backend picked (`vllm.v1.attention.backends.cpu_attn._get_attn_isa`): with ``"vec"`` / ``"vec16"``
(x86 without AMX-bf16, and head sizes not a multiple of 32) the keys of a block are stored transposed,
``[D, block_size]``, and the values plainly, ``[block_size, D]`` (checked against ``cpu_attn_reshape_and_cache`` in
the tests).  Other ISAs (AMX, NEON, ...) pack the cache differently: `readable` is False for them and the backend
leaves those layers to vLLM's own attention.  `read_flash_keys` / `read_flash_values` read the layout of
vLLM's FlashAttention backend (CUDA) the same way (untested on a GPU so far)."""
from __future__ import annotations

import torch
from ...layout import ceil_div

#: ISAs whose cache layout `read_request_kv` knows
READABLE_ISAS = ("vec", "vec16")


def readable(isa: str, kv_cache_dtype: str) -> bool:
    return isa in READABLE_ISAS and kv_cache_dtype == "auto"


def read_request_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int):
    """``k, v [1, Hkv, seq_len, D]`` of the request whose block table row starts with ``block_ids`` (at least
    ``ceil(seq_len / block_size)`` entries): fresh tensors (the first ``seq_len`` rows of ``[Hkv, blocks x
    block_size, D]`` buffers), each gathered from the cache in one copy."""
    return read_request_keys(kv_cache, block_ids, seq_len), read_request_values(kv_cache, block_ids, seq_len)


def read_request_keys(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The keys of `read_request_kv` alone (a layer that may still go dense needs no values)."""
    return _gather(kv_cache, block_ids, seq_len, 0)


def read_request_values(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The values of `read_request_kv` alone."""
    return _gather(kv_cache, block_ids, seq_len, 1)


def read_flash_keys(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The keys of one request from a FlashAttention-layout cache (vLLM's CUDA backend): ``kv_cache [num_blocks,
    Hkv, block_size, 2 * D]`` holding token ``s`` of a block's key in ``[..., s, :D]`` and its value in
    ``[..., s, D:]`` (what ``FlashAttentionImpl.forward`` splits as ``kv_cache.transpose(1, 2).split(D, -1)``)."""
    return _gather(kv_cache, block_ids, seq_len, 0, flash=True)


def read_flash_values(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The values of `read_flash_keys`."""
    return _gather(kv_cache, block_ids, seq_len, 1, flash=True)


def _gather(kv_cache, block_ids, seq_len: int, part: int, flash: bool = False) -> torch.Tensor:
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    n = ceil_div(seq_len, block_size)
    rows = kv_cache.new_empty(num_kv_heads, n * block_size, head_dim)
    per_block = rows.view(num_kv_heads, n, block_size, head_dim).transpose(0, 1)        # [n, Hkv, bs, D] view
    if flash:           # keys and values side by side in each token's row
        source = kv_cache[..., part * head_dim:(part + 1) * head_dim]
    else:               # CPU: all keys of a (block, head), then all its values
        source = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_dim)[:, :, part]
        if part == 0:   # keys are stored transposed per block, [D, bs]: gather through the transposed view
            source, per_block = source.view(num_blocks, num_kv_heads, head_dim, block_size), per_block.transpose(2, 3)
        else:
            source = source.view(num_blocks, num_kv_heads, block_size, head_dim)
    # index_select writes through the permuted view: one copy from the blocks into the rows
    torch.index_select(source, 0, block_ids[:n].long(), out=per_block)
    return rows[:, :seq_len].unsqueeze(0)
