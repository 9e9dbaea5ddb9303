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
    """``k, v [1, Hkv, seq_len, D]`` (fresh contiguous tensors) of the request whose block table row starts with
    ``block_ids`` (at least ``ceil(seq_len / block_size)`` entries)."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    n = -(-seq_len // block_size)
    blocks = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_dim).index_select(0, block_ids[:n])
    # keys [n, Hkv, D, bs] -> [Hkv, n, bs, D]; values [n, Hkv, bs, D] -> [Hkv, n, bs, D]
    k = blocks[:, :, 0].view(n, num_kv_heads, head_dim, block_size).permute(1, 0, 3, 2)
    v = blocks[:, :, 1].view(n, num_kv_heads, block_size, head_dim).permute(1, 0, 2, 3)
    k = k.reshape(num_kv_heads, n * block_size, head_dim)[:, :seq_len]
    v = v.reshape(num_kv_heads, n * block_size, head_dim)[:, :seq_len]
    return k.unsqueeze(0), v.unsqueeze(0)
