"""The compiled CUDA kernels on a GPU (marker ``gpu``; skipped without CUDA and CuPy): sparse attention against the
fp32 oracle with FlashAttention-style tolerances, and the index kernel against the torch conversion."""
import importlib.util
import random

import pytest
import torch

import sparse_attn as sa
from sparse_attn.integrations import convert_vertical_slash_indexes
from sparse_attn.integrations.vertical_slash_clipped import clipped_vertical_slash_indexes
from sparse_attn.backends.cuda.launcher import cuda_convert_vertical_slash_indexes, cuda_sparse_attention
from helpers import make_qkv, plain_attention, random_layout
from cuda_helpers import random_index_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None,
                                 reason="needs a CUDA GPU and CuPy")]

SHAPES = [  # B, Hq, Hkv, Lq, Lk, D, block_m, block_n
    (2, 4, 2, 65, 113, 64, 64, 64),
    (1, 4, 1, 1, 63, 128, 64, 64),
    (2, 2, 2, 113, 1000, 80, 64, 64),
    (1, 8, 2, 1000, 1000, 128, 64, 64),
    (1, 2, 1, 63, 65, 96, 16, 32),
    (1, 2, 2, 130, 200, 256, 128, 100),
]


def errors_vs_oracle(out, q, k, v, mask, causal, dtype):
    """(kernel error, plain-torch error in ``dtype``) vs the fp32 oracle over rows that see a key; and the
    rows that see none."""
    ref = sa.reference_attention(q.float(), k.float(), v.float(), mask, causal=causal)
    plain = plain_attention(q.to(dtype).cuda(), k.to(dtype).cuda(), v.to(dtype).cuda(), mask, causal=causal)
    plain = plain.float().cpu()                                   # plain torch in dtype on the same GPU
    rows = torch.arange(q.shape[2])[:, None] + (k.shape[2] - q.shape[2])
    visible = mask & ((torch.arange(k.shape[2])[None, :] <= rows) if causal else True)
    seen = visible.any(-1)
    err = (out.float().cpu() - ref).abs()[seen].max().item() if seen.any() else 0.0
    base = (plain - ref).abs()[seen].max().item() if seen.any() else 0.0
    return err, base, ~seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_attention_matches_oracle(shape, causal, dtype):
    B, Hq, Hkv, Lq, Lk, D, bm, bn = shape
    rng = random.Random(sum(shape) + causal)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, seed=len(SHAPES) + Lq,
                       contiguity=rng.choice(["contiguous", "blhd", "strided"]))
    layout, _, _ = random_layout(rng, B, Hq, Lq, Lk, bm, bn, p_column=0.3)
    out, lse = cuda_sparse_attention(q.cuda(), k.cuda(), v.cuda(), layout.to("cuda"), causal=causal,
                                     return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    mask = layout.to_mask()
    err, base, empty = errors_vs_oracle(out, q, k, v, mask, causal, dtype)
    assert err <= 2 * base + 1e-5, f"kernel error {err:.3g} > 2 x plain {dtype} error {base:.3g}"
    assert torch.equal(out.cpu()[empty], torch.zeros_like(out.cpu()[empty]))
    ref_lse = sa.reference_attention(q.float(), k.float(), v.float(), mask, causal=causal, return_lse=True)[1]
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(ref_lse))
    finite = ~torch.isneginf(ref_lse)
    assert (lse.cpu()[finite] - ref_lse[finite]).abs().max().item() < 1e-3          # fp32 math on the same inputs


def test_cuda_backend_through_public_api_on_a_side_stream():
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, 1000, 1000, 128, dtype=torch.bfloat16, seed=3))
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=64, slash=128))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                         # the kernel must run on torch's current stream
        out = sa.sparse_attention(q, k, v, layout, backend="cuda")
    side.synchronize()
    torch_out = sa.sparse_attention(q, k, v, layout, backend="torch")
    assert (out.float() - torch_out.float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("causal", [True, False])
def test_cuda_index_kernel_equals_torch_conversion(causal):
    rng = random.Random(11 + causal)
    for _ in range(40):
        case = random_index_case(rng, causal)
        expected = clipped_vertical_slash_indexes(case[0].tolist(), case[1].tolist(), *case[2:7],
                                                  causal=causal)                      # CPU tensors: torch path
        on_gpu = [t.cuda() if isinstance(t, torch.Tensor) else t for t in case[:7]]
        results = [cuda_convert_vertical_slash_indexes(*on_gpu, causal=causal)]
        if causal:                                   # clip=True dispatches to the kernel (bottom-right when causal)
            results.append(convert_vertical_slash_indexes(*on_gpu, causal=causal, clip=True))
        for got in results:
            for e, g in zip(expected, got):
                assert g.is_cuda and g.dtype == torch.int32 and torch.equal(e, g.cpu()), case
