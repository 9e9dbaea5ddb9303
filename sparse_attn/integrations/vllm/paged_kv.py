"""Read one request's keys and values out of vLLM's CPU_ATTN paged KV cache, as BHLD tensors for our API.

The cache of a layer is ``kv_cache [num_blocks, Hkv, block_size, 2 * D]``; per (block, KV head) the first
``block_size * D`` elements hold the keys and the rest the values.  How the keys sit inside that space depends on
the ISA the CPU backend picked (`vllm.v1.attention.backends.cpu_attn._get_attn_isa`): with ``"vec"`` / ``"vec16"``
(x86 without AMX-bf16, and head sizes not a multiple of 32) the keys of a block are stored transposed,
``[D, block_size]``, and the values plainly, ``[block_size, D]`` (checked against ``cpu_attn_reshape_and_cache`` in
the tests).  Other ISAs (AMX, NEON, ...) pack the cache differently: `readable` is False for them and the backend
leaves those layers to vLLM's own attention."""
from __future__ import annotations

import torch

#: ISAs whose cache layout `read_request_kv` knows
READABLE_ISAS = ("vec", "vec16")


def readable(isa: str, kv_cache_dtype: str) -> bool:
    return isa in READABLE_ISAS and kv_cache_dtype == "auto"


def read_request_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int):
    """``k, v [1, Hkv, seq_len, D]`` of the request whose block table row starts with ``block_ids`` (at least
    ``ceil(seq_len / block_size)`` entries): fresh tensors (the first ``seq_len`` rows of ``[Hkv, blocks x
    block_size, D]`` buffers), each gathered from the cache in one copy."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    n = -(-seq_len // block_size)
    ids = block_ids[:n].long()
    parts = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_dim)
    k = kv_cache.new_empty(num_kv_heads, n * block_size, head_dim)
    v = torch.empty_like(k)
    # index_select writes through the permuted views: keys [n, Hkv, D, bs] and values [n, Hkv, bs, D] per block
    # land as rows [Hkv, n * bs, D] with no intermediate gather
    torch.index_select(parts[:, :, 0].view(num_blocks, num_kv_heads, head_dim, block_size), 0, ids,
                       out=k.view(num_kv_heads, n, block_size, head_dim).permute(1, 0, 3, 2))
    torch.index_select(parts[:, :, 1].view(num_blocks, num_kv_heads, block_size, head_dim), 0, ids,
                       out=v.view(num_kv_heads, n, block_size, head_dim).transpose(0, 1))
    return k[:, :seq_len].unsqueeze(0), v[:, :seq_len].unsqueeze(0)
