"""`read_flash_keys` / `read_flash_values` (the CUDA backend's paged-cache reader) against the view
``FlashAttentionImpl.forward`` takes of the same cache, ``kv_cache.transpose(1, 2).split(D, -1)``.  Plain torch, no
vLLM needed: runs in the main suite on CPU and, marked ``gpu``, on a CUDA device (where ``index_select`` writes
through a permuted ``out=`` view)."""
import pytest
import torch

from sparse_attn.integrations.vllm.paged_kv import read_flash_keys, read_flash_values


def _check(device, dtype, head_dim, block_size, seq_len):
    gen = torch.Generator().manual_seed(seq_len)
    num_blocks, kv_heads = 2 * -(-seq_len // block_size) + 3, 2
    kv_cache = torch.randn(num_blocks, kv_heads, block_size, 2 * head_dim, generator=gen).to(device, dtype)
    row = torch.randperm(num_blocks, generator=gen)[:-(-seq_len // block_size) + 2].to(device, torch.int32)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_dim, dim=-1)       # as FlashAttention views it
    slots = torch.arange(seq_len, device=device)
    blocks = row.long()[slots // block_size]
    k, v = read_flash_keys(kv_cache, row, seq_len), read_flash_values(kv_cache, row, seq_len)
    assert k.shape == v.shape == (1, kv_heads, seq_len, head_dim) and k.device == kv_cache.device
    assert torch.equal(k[0], key_cache[blocks, slots % block_size].transpose(0, 1))
    assert torch.equal(v[0], value_cache[blocks, slots % block_size].transpose(0, 1))


@pytest.mark.parametrize("head_dim, block_size, seq_len", [(64, 16, 300), (128, 16, 97), (80, 32, 32)])
def test_flash_reader_on_cpu(head_dim, block_size, seq_len):
    _check("cpu", torch.float32, head_dim, block_size, seq_len)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim, block_size, seq_len", [(64, 16, 300), (128, 16, 4097), (128, 32, 32768)])
def test_flash_reader_on_cuda(dtype, head_dim, block_size, seq_len):
    _check("cuda", dtype, head_dim, block_size, seq_len)


@pytest.mark.gpu
def test_sparse_run_on_what_the_flash_reader_gives_matches_dense():
    """The calls `SparsePrefillLayer._sparse_prefill` makes on CUDA (estimate, then the kernel writing into the
    output rows through a BHLD view), on keys and values read from a FlashAttention-layout cache, with a budget that
    covers every key: the dense result (fp16 tolerance)."""
    import sparse_attn as sa
    from sparse_attn import prefill

    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, block_size, seq_len, lq = 8, 2, 128, 16, 5000, 1500
    num_blocks = -(-seq_len // block_size) + 4
    kv_cache = torch.randn(num_blocks, hkv, block_size, 2 * d, generator=gen).cuda().half()
    row = torch.randperm(num_blocks, generator=gen)[:-(-seq_len // block_size)].cuda().int()
    query = torch.randn(lq, hq, d, generator=gen).cuda().half()                  # vLLM's [tokens, Hq, D] rows
    out = torch.full_like(query, float("nan"))
    q = query.transpose(0, 1).unsqueeze(0)
    k, v = read_flash_keys(kv_cache, row, seq_len), read_flash_values(kv_cache, row, seq_len)
    full = [sa.VerticalSlash(vertical=1 << 14, slash=1 << 14)] * hq
    layout = prefill.estimate(q, k, full, causal=True)
    prefill.sparse_attention(q, k, v, layout, causal=True, check_layout=False, out=out.transpose(0, 1).unsqueeze(0))
    expected = sa.reference_attention(q, k, v)[0].transpose(0, 1)
    plain = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1),
        attn_mask=torch.ones(lq, seq_len, dtype=torch.bool, device="cuda").tril(seq_len - lq))[0].transpose(0, 1)
    tolerance = 2 * (plain.float() - expected.float()).abs().max().item() + 1e-3
    assert (out.float() - expected.float()).abs().max().item() <= tolerance
