"""vLLM's CPU attention backend with sparse prefill: CPU_ATTN with `sparse_layer.SparsePrefillLayer` in front of its
implementation.  Long prompts of a step run `sparse_attn.estimate` + `sparse_attn.sparse_attention` over their keys
read from the paged KV cache (`paged_kv`); everything else runs vLLM's own CPU_ATTN kernel unchanged, on a sub-batch
when some requests of the step ran sparse (the same metadata restricted to their rows, with its own scheduler
metadata)."""
from __future__ import annotations

import dataclasses

from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .paged_kv import read_request_keys, read_request_values, readable
from .sparse_layer import SparsePrefillLayer


class SparseCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with `SparseCPUAttentionImpl`: same name, metadata builder and cache layout as vLLM's."""

    @staticmethod
    def get_impl_cls():
        return SparseCPUAttentionImpl


class SparseCPUAttentionImpl(SparsePrefillLayer, CPUAttentionBackendImpl):
    device_type = "cpu"

    def _window_free(self) -> bool:
        return self.sliding_window == -1

    def _cache_readable(self, layer, meta) -> bool:
        return meta.dynamic_causal is None and readable(getattr(layer, "isa", ""), self.kv_cache_dtype)

    def _read_keys(self, kv_cache, block_ids, seq_len):
        return read_request_keys(kv_cache, block_ids, seq_len)

    def _read_values(self, kv_cache, block_ids, seq_len):
        return read_request_values(kv_cache, block_ids, seq_len)

    def _subset_metadata(self, layer, meta, index, query_start_loc, num_tokens, max_query_len, max_seq_len,
                         dtype):
        sub_seq_lens = meta.seq_lens.index_select(0, index)
        scheduler = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(index), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_size,
            seq_lens=sub_seq_lens, dtype=dtype, query_start_loc=query_start_loc, causal=True,
            sliding_window_size=-1, isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=self.kv_cache_dtype)
        return dataclasses.replace(
            meta, num_actual_tokens=num_tokens, max_query_len=max_query_len, query_start_loc=query_start_loc,
            max_seq_len=max_seq_len, seq_lens=sub_seq_lens, block_table=meta.block_table.index_select(0, index),
            scheduler_metadata=scheduler)
