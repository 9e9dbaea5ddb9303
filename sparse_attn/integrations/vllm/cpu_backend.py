"""vLLM's CPU attention backend with sparse prefill: long prompts of a step run `sparse_attn.estimate` +
`sparse_attn.sparse_attention` over their keys read from the paged KV cache; everything else runs vLLM's own
CPU_ATTN kernel unchanged.

Per layer and step (`SparseCPUAttentionImpl.forward`): the requests of the batch whose query is more than one token
and whose key length (cached prefix + earlier chunks + this chunk) reaches ``dense_below`` are candidates.  Each
candidate's queries ``[1, Hq, Lq, D]`` (this rank's heads; the last Lq of its ``seq_len`` positions, bottom-right
causal alignment, so chunked prefill and prefix-cache hits need nothing special) attend over all its keys with this
layer's patterns; a candidate whose patterns are all dense, or whose layout would be denser than ``dense_above``,
goes back to vLLM (and so do its later prefill chunks, without deciding again, until its key length has doubled:
`dense_memory`).  The remaining requests (decode tokens, short prompts, those sent back) run vLLM's kernel on a
sub-batch: the same metadata restricted to their rows, with its own scheduler metadata; a step with no candidate
at all (decode only, short prompts only) goes to vLLM's kernel before any per-request work.  Layers the plugin cannot
run (sliding window, ALiBi, soft-capping, sinks, non-decoder attention, a KV-cache layout it cannot read) are left
to vLLM entirely."""
from __future__ import annotations

import dataclasses
from functools import cached_property

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ... import prefill
# the same cheap "is this layer too diffuse to pay?" certificate the HF integration uses (one implementation)
from ..hf.attention import _mass_needs_dense
from .dense_memory import DenseMemory
from .paged_kv import read_request_keys, read_request_values, readable
from .settings import load_settings


class SparseCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with `SparseCPUAttentionImpl`: same name, metadata builder and cache layout as vLLM's."""

    @staticmethod
    def get_impl_cls():
        return SparseCPUAttentionImpl


class SparseCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = load_settings()
        # features our kernels do not implement: such a layer is vLLM's alone
        self.sparse_capable = (self.attn_type == AttentionType.DECODER and self.sliding_window == -1
                               and self.alibi_slopes is None and not self.logits_soft_cap and self.sinks is None
                               and self.kv_sharing_target_layer_name is None)
        self.sent_dense = DenseMemory()          # requests this layer sent back to vLLM, for their later chunks

    @cached_property
    def _heads(self) -> slice:
        """This tensor-parallel rank's query heads in the model's numbering (vLLM gives rank r a contiguous slice)."""
        from vllm.distributed import get_tensor_model_parallel_rank
        rank = get_tensor_model_parallel_rank()
        return slice(rank * self.num_heads, (rank + 1) * self.num_heads)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        meta = attn_metadata
        if (meta is None or not self.sparse_capable or meta.causal is not True or meta.dynamic_causal is not None
                or output_scale is not None or not readable(getattr(layer, "isa", ""), self.kv_cache_dtype)
                or meta.max_query_len <= 1 or meta.max_seq_len < self.settings.dense_below):   # decode / short
            return super().forward(layer, query, key, value, kv_cache, meta, output, output_scale,
                                   output_block_scale)
        starts = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        num_reqs = len(seq_lens)
        candidates = [r for r in range(num_reqs)
                      if starts[r + 1] - starts[r] > 1 and seq_lens[r] >= self.settings.dense_below]
        if not candidates:
            return super().forward(layer, query, key, value, kv_cache, meta, output)
        from vllm.model_executor.models.utils import extract_layer_index
        layer_idx = extract_layer_index(layer.layer_name)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        ran_sparse = set()
        for r in candidates:
            if self._sparse_prefill(layer_idx, query[starts[r]:starts[r + 1]], kv_cache,
                                    meta.block_table[r], seq_lens[r], out[starts[r]:starts[r + 1]]):
                ran_sparse.add(r)
        rest = [r for r in range(num_reqs) if r not in ran_sparse]
        if len(rest) == num_reqs:
            return super().forward(layer, query, key, value, kv_cache, meta, output)
        if rest:
            self._vllm_subset(layer, query, key, value, kv_cache, meta, rest, starts, seq_lens, out)
        return output

    def _sparse_prefill(self, layer_idx, query, kv_cache, block_ids, seq_len, out) -> bool:
        """Sparse attention of one request's ``query [Lq, Hq, D]`` over its ``seq_len`` cached keys into
        ``out [Lq, Hq, D]``; False (nothing written) when the layer or the estimated layout should stay dense."""
        patterns = self.settings.patterns(layer_idx, seq_len, self._heads, self.num_heads)
        if patterns is None or all(isinstance(p, prefill.Dense) for p in patterns):
            return False
        dense_above = self.settings.dense_above
        if dense_above < 1 and self.sent_dense.is_dense(block_ids, seq_len):     # an earlier chunk decided
            return False
        q = query.transpose(0, 1).unsqueeze(0)                                    # [1, Hq, Lq, D]
        k = read_request_keys(kv_cache, block_ids, seq_len)                       # [1, Hkv, seq_len, D]
        if dense_above < 1 and _mass_needs_dense(q, k, patterns, self.scale, dense_above):
            self.sent_dense.remember(block_ids, seq_len, kv_cache.shape[2])
            return False
        layout = prefill.estimate(q, k, patterns, causal=True, scale=self.scale)
        if dense_above < 1 and layout.density() > dense_above:
            self.sent_dense.remember(block_ids, seq_len, kv_cache.shape[2])
            return False
        v = read_request_values(kv_cache, block_ids, seq_len)                     # only once sparse is decided
        # the kernel writes straight into vLLM's output rows (viewed as BHLD): no result tensor, no copy
        prefill.sparse_attention(q, k, v, layout, causal=True, scale=self.scale, check_layout=False,
                                 out=out.transpose(0, 1).unsqueeze(0))
        return True

    def _vllm_subset(self, layer, query, key, value, kv_cache, meta, reqs, starts, seq_lens, out) -> None:
        """vLLM's kernel on requests ``reqs`` only: their query rows, their slice of the metadata."""
        lens = [starts[r + 1] - starts[r] for r in reqs]
        sub_starts = [0]
        for n in lens:
            sub_starts.append(sub_starts[-1] + n)
        contiguous = reqs == list(range(reqs[0], reqs[-1] + 1))
        if contiguous:
            rows = slice(starts[reqs[0]], starts[reqs[-1] + 1])
            sub_query, sub_out = query[rows], out[rows]
        else:
            rows = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in reqs])
            sub_query, sub_out = query.index_select(0, rows), out.new_empty(len(rows), *out.shape[1:])
        index = torch.tensor(reqs, dtype=torch.long)
        query_start_loc = torch.tensor(sub_starts, dtype=meta.query_start_loc.dtype)
        sub_seq_lens = meta.seq_lens.index_select(0, index)
        scheduler = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(reqs), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_size,
            seq_lens=sub_seq_lens, dtype=query.dtype, query_start_loc=query_start_loc, causal=True,
            sliding_window_size=-1, isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=self.kv_cache_dtype)
        sub_meta = dataclasses.replace(
            meta, num_actual_tokens=sub_starts[-1], max_query_len=max(lens), query_start_loc=query_start_loc,
            max_seq_len=max(seq_lens[r] for r in reqs), seq_lens=sub_seq_lens,
            block_table=meta.block_table.index_select(0, index), scheduler_metadata=scheduler)
        CPUAttentionBackendImpl.forward(self, layer, sub_query, key, value, kv_cache, sub_meta, sub_out)
        if not contiguous:
            out.index_copy_(0, rows, sub_out)
