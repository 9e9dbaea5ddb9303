"""backend="flex": compiled FlexAttention on block-aligned layouts, against the dense oracle."""
import pytest
import torch

import sparse_attn as sa
from helpers import make_qkv


@pytest.mark.parametrize("causal", [True, False])
def test_flex_backend_matches_the_oracle_on_aligned_layouts(causal):
    q, k, v = make_qkv(2, 4, 2, 200, 320, 64, seed=11)
    layout = sa.estimate(q, k, sa.BlockSparse(top_k=2), causal=causal)
    assert layout.density(causal) < 0.9
    out = sa.sparse_attention(q, k, v, layout, causal=causal, backend="flex")
    ref = sa.reference_attention(q, k, v, layout.to_mask(), causal=causal)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_flex_backend_rejects_unaligned_layouts():
    q, k, v = make_qkv(1, 2, 1, 200, 200, 64, seed=12)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=16, slash=64, sink=4, local=64))
    with pytest.raises(ValueError, match="unaligned tiles or columns"):
        sa.sparse_attention(q, k, v, layout, backend="flex")


def test_flex_backend_refuses_lse_on_cpu():
    q, k, v = make_qkv(1, 2, 1, 128, 128, 64, seed=13)
    layout = sa.estimate(q, k, sa.BlockSparse(top_k=1))
    with pytest.raises(ValueError, match="return_lse"):
        sa.sparse_attention(q, k, v, layout, backend="flex", return_lse=True)


def test_gpu_kernel_tiles_divide_the_layout_blocks():
    """Compiled GPU FlexAttention needs its tiles to divide the BlockMask's blocks (its Hopper default of 128 rows
    does not divide our 64): the options name the largest power of two dividing each block, at most 128."""
    from sparse_attn.backends.flex.attention import gpu_tile, kernel_options

    q, k, _ = make_qkv(1, 2, 1, 300, 300, 64, seed=14)
    for block_m, block_n, want in ((64, 64, (64, 64)), (128, 256, (128, 128)), (96, 48, (32, 16))):
        layout = sa.estimate(q, k, sa.BlockSparse(top_k=1), block_m=block_m, block_n=block_n)
        assert kernel_options(layout, "cuda") == {"BLOCK_M": want[0], "BLOCK_N": want[1]}
        assert kernel_options(layout, "cpu") is None                  # the CPU kernel picks its own
    assert gpu_tile(100) == 4                                         # too small: backend "flex" refuses it on CUDA
