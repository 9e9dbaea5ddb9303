"""The plugin's per-layer logic, the same on every platform: which requests of a step run sparse prefill, the
sparse run itself, and handing everything else to the platform's own attention implementation.

Per layer and step (`SparsePrefillLayer.forward`): the requests of the batch whose query is more than one token and
whose key length (cached prefix + earlier chunks + this chunk) reaches ``dense_below`` are candidates.  Each
candidate's queries ``[1, Hq, Lq, D]`` (this rank's heads; the last Lq of its ``seq_len`` positions, bottom-right
causal alignment, so chunked prefill and prefix-cache hits need nothing special) attend over all its keys with this
layer's patterns; a candidate whose patterns are all dense, or whose layout would be denser than ``dense_above``,
goes back to vLLM (and so do its later prefill chunks, without deciding again, until its key length has doubled:
`dense_memory`).  The remaining requests (decode tokens, short prompts, those sent back) run the platform's kernel
on a sub-batch; a step with no candidate at all (decode only, short prompts only) goes to the platform's kernel
before any per-request work (no host read of device metadata on such steps).  Layers the plugin cannot run (sliding
window, ALiBi, soft-capping, sinks, non-decoder attention, a KV-cache layout it cannot read) are left to vLLM.

A platform backend mixes `SparsePrefillLayer` in front of the platform's attention implementation and supplies the
platform's parts: `_cache_readable`, `_read_keys` / `_read_values` (its paged-cache layout) and `_forward_subset`
(its kernel on some of the step's requests)."""
from __future__ import annotations

from functools import cached_property

import torch
from vllm.v1.attention.backend import AttentionType

from ... import prefill
# the same cheap "is this layer too diffuse to pay?" certificate the HF integration uses (one implementation)
from ..hf.attention import _mass_needs_dense
from .dense_memory import DenseMemory
from .settings import load_settings


class SparsePrefillLayer:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = load_settings()
        # features our kernels do not implement: such a layer is vLLM's alone
        self.sparse_capable = (self.attn_type == AttentionType.DECODER and self._window_free()
                               and self.alibi_slopes is None and not self.logits_soft_cap and self.sinks is None
                               and self.kv_sharing_target_layer_name is None)
        self.sent_dense = DenseMemory()          # requests this layer sent back to vLLM, for their later chunks

    # ---- the platform's parts ----
    #: the device the platform's tensors live on ("cpu", "cuda"): sets the default ``dense_below``
    device_type: str

    def _window_free(self) -> bool:
        raise NotImplementedError

    def _cache_readable(self, layer, meta) -> bool:
        """Whether this step's KV cache (layout, dtype) and metadata are what `_read_keys` and the sub-batch know."""
        raise NotImplementedError

    def _read_keys(self, kv_cache, block_ids, seq_len):
        """``[1, Hkv, seq_len, D]`` keys of the request with block table row ``block_ids``."""
        raise NotImplementedError

    def _read_values(self, kv_cache, block_ids, seq_len):
        raise NotImplementedError

    def _subset_metadata(self, layer, meta, index, query_start_loc, num_tokens, max_query_len, max_seq_len,
                         dtype):
        """The platform's metadata ``meta`` restricted to the requests ``index`` (a long tensor on the metadata's
        device), whose query rows, packed, start at ``query_start_loc``."""
        raise NotImplementedError

    # ---- shared ----
    @property
    def _dense_below(self) -> int:
        return self.settings.dense_below_on(self.device_type)

    @cached_property
    def _heads(self) -> slice:
        """This tensor-parallel rank's query heads in the model's numbering (vLLM gives rank r a contiguous slice)."""
        from vllm.distributed import get_tensor_model_parallel_rank
        rank = get_tensor_model_parallel_rank()
        return slice(rank * self.num_heads, (rank + 1) * self.num_heads)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        meta = attn_metadata
        if (meta is None or not self.sparse_capable or meta.causal is not True or output_scale is not None
                or meta.max_query_len <= 1 or meta.max_seq_len < self._dense_below   # decode / short
                or not self._cache_readable(layer, meta)):
            return super().forward(layer, query, key, value, kv_cache, meta, output, output_scale,
                                   output_block_scale)
        starts = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        num_reqs = len(seq_lens)
        candidates = [r for r in range(num_reqs)
                      if starts[r + 1] - starts[r] > 1 and seq_lens[r] >= self._dense_below]
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
            self._forward_subset(layer, query, key, value, kv_cache, meta, rest, starts, seq_lens, out)
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
        k = self._read_keys(kv_cache, block_ids, seq_len)                         # [1, Hkv, seq_len, D]
        if dense_above < 1 and _mass_needs_dense(q, k, patterns, self.scale, dense_above):
            self.sent_dense.remember(block_ids, seq_len, self._block_size(kv_cache))
            return False
        layout = prefill.estimate(q, k, patterns, causal=True, scale=self.scale)
        if dense_above < 1 and layout.density() > dense_above:
            self.sent_dense.remember(block_ids, seq_len, self._block_size(kv_cache))
            return False
        v = self._read_values(kv_cache, block_ids, seq_len)                       # only once sparse is decided
        # the kernel writes straight into vLLM's output rows (viewed as BHLD): no result tensor, no copy
        prefill.sparse_attention(q, k, v, layout, causal=True, scale=self.scale, check_layout=False,
                                 out=out.transpose(0, 1).unsqueeze(0))
        return True

    def _forward_subset(self, layer, query, key, value, kv_cache, meta, reqs, starts, seq_lens, out) -> None:
        """The platform's kernel on requests ``reqs`` only (their query rows, their slice of the metadata), writing
        their rows of ``out [tokens, Hq, D]``."""
        lens = [starts[r + 1] - starts[r] for r in reqs]
        sub_starts = [0]
        for n in lens:
            sub_starts.append(sub_starts[-1] + n)
        contiguous = reqs == list(range(reqs[0], reqs[-1] + 1))
        if contiguous:
            rows = slice(starts[reqs[0]], starts[reqs[-1] + 1])
            sub_query, sub_out = query[rows], out[rows]
        else:
            rows = torch.cat([torch.arange(starts[r], starts[r + 1], device=query.device) for r in reqs])
            sub_query, sub_out = query.index_select(0, rows), out.new_empty(len(rows), *out.shape[1:])
        device = meta.seq_lens.device
        sub_meta = self._subset_metadata(
            layer, meta, torch.tensor(reqs, dtype=torch.long, device=device),
            torch.tensor(sub_starts, dtype=meta.query_start_loc.dtype, device=meta.query_start_loc.device),
            sub_starts[-1], max(lens), max(seq_lens[r] for r in reqs), query.dtype)
        # the platform's own forward (next in the method order after this class)
        super().forward(layer, sub_query, key, value, kv_cache, sub_meta, sub_out)
        if not contiguous:
            out.index_copy_(0, rows, sub_out)

    @staticmethod
    def _block_size(kv_cache) -> int:
        """Tokens per cache block: dimension 2 of both platforms' ``[num_blocks, Hkv, block_size, 2 * D]``."""
        return kv_cache.shape[2]
