"""vLLM's FlashAttention backend (CUDA) with sparse prefill: FLASH_ATTN with `sparse_layer.SparsePrefillLayer` in
front of its implementation, the same routing as on CPU (`cpu_backend`).  Long prompts run `sparse_attn.estimate` +
`sparse_attn.sparse_attention` (the Triton kernels) over their keys read from the paged cache
(`paged_kv.read_flash_keys`); everything else runs vLLM's FlashAttention kernel unchanged, on a sub-batch when some
requests of the step ran sparse.

NOT RUN ON A GPU YET: there has been no vLLM on the GPU machines.  Its routing, cache reader and sub-batch metadata
are tested on CPU with FlashAttention's kernel replaced by a dense reference
(tests/integrations/vllm_plugin/test_vllm_cuda_backend.py).  Layers it leaves to FlashAttention: those of
`SparsePrefillLayer`, plus quantized (fp8) KV caches, decode context parallelism, multimodal prefix ranges and
R-SWA metadata.  Steps with a sparse candidate read ``query_start_loc`` / ``seq_lens`` to the host (a sync); decode
steps return before that."""
from __future__ import annotations

import dataclasses

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from .paged_kv import read_flash_keys, read_flash_values
from .sparse_layer import SparsePrefillLayer


class SparseFlashAttentionBackend(FlashAttentionBackend):
    """FLASH_ATTN with `SparseFlashAttentionImpl`: same name, metadata builder and cache layout as vLLM's."""

    @staticmethod
    def get_impl_cls():
        return SparseFlashAttentionImpl


class SparseFlashAttentionImpl(SparsePrefillLayer, FlashAttentionImpl):
    device_type = "cuda"

    def _window_free(self) -> bool:
        return self.sliding_window in (None, (-1, -1))

    def _cache_readable(self, layer, meta) -> bool:
        return (self.kv_cache_dtype == "auto" and self.dcp_world_size == 1 and not getattr(self, "fa4_hd256", False)
                and getattr(meta, "mm_prefix_query_range_tensor", None) is None
                and getattr(meta, "rswa_prefix_lens", None) is None)

    def _read_keys(self, kv_cache, block_ids, seq_len):
        return read_flash_keys(kv_cache, block_ids, seq_len)

    def _read_values(self, kv_cache, block_ids, seq_len):
        return read_flash_values(kv_cache, block_ids, seq_len)

    def _subset_metadata(self, layer, meta, index, query_start_loc, num_tokens, max_query_len, max_seq_len,
                         dtype):
        # FlashAttention plans its own split schedule when given none (the step's plan is for the whole batch)
        return dataclasses.replace(
            meta, num_actual_tokens=num_tokens, max_query_len=max_query_len, query_start_loc=query_start_loc,
            max_seq_len=max_seq_len, seq_lens=meta.seq_lens.index_select(0, index),
            block_table=meta.block_table.index_select(0, index), scheduler_metadata=None, max_num_splits=0)
