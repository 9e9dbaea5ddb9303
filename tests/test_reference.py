"""The dense oracle `reference_attention` against independent dense attentions (torch SDPA, fp64 math)."""
import pytest
import torch

import sparse_attn as sa
from helpers import (HEAD_CONFIGS, assert_close, assert_lse_close, causal_mask, lse_fp64, make_qkv,
                      plain_attention, sdpa)

SHAPES = [(1, 1), (63, 63), (65, 65), (113, 113), (65, 300), (1, 130)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk", SHAPES)
@pytest.mark.parametrize("heads", list(HEAD_CONFIGS))
def test_reference_matches_sdpa(lq, lk, heads, causal):
    hq, hkv = HEAD_CONFIGS[heads]
    q, k, v = make_qkv(2, hq, hkv, lq, lk, 80, seed=lq * 7 + lk, contiguity="blhd")
    out, lse = sa.reference_attention(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert_close(out, sdpa(q, k, v, causal=causal), atol=2e-5)
    assert_lse_close(lse, lse_fp64(q, k, causal=causal).float(), atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_with_mask_matches_fp64_math(causal):
    q, k, v = make_qkv(2, 4, 2, 65, 130, 64, seed=3)
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 4, 65, 130, generator=gen) < 0.3
    mask[..., -1] = True          # the diagonal key: every row sees something, also when causal
    out, lse = sa.reference_attention(q, k, v, mask, causal=causal, return_lse=True)
    expected = plain_attention(q, k, v, mask, causal=causal, work=torch.float64)
    assert_close(out, expected, atol=1e-5)
    assert_lse_close(lse, lse_fp64(q, k, mask, causal=causal).float())
    # and the mask matters: without it the result differs
    assert (out - sa.reference_attention(q, k, v, causal=causal)).abs().max() > 1e-2


def test_reference_mask_broadcasts_and_all_true_is_no_mask():
    q, k, v = make_qkv(2, 2, 1, 40, 70, 64, seed=11)
    full = torch.ones(40, 70, dtype=torch.bool)
    assert_close(sa.reference_attention(q, k, v, full), sa.reference_attention(q, k, v), atol=0)
    gen = torch.Generator().manual_seed(2)
    m2 = torch.rand(40, 70, generator=gen) < 0.5
    m2[:, 0] = True
    assert_close(sa.reference_attention(q, k, v, m2), sa.reference_attention(q, k, v, m2.expand(2, 2, 40, 70)),
                 atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_empty_rows_give_zero_and_neg_inf(causal):
    q, k, v = make_qkv(2, 2, 2, 30, 50, 64, seed=1)
    mask = torch.zeros(2, 2, 30, 50, dtype=torch.bool)
    mask[0, 1, 3:9, 10:20] = True
    mask[1, 0, :, 0] = True
    out, lse = sa.reference_attention(q, k, v, mask, causal=causal, return_lse=True)
    seen = (mask & (causal_mask(30, 50) if causal else True)).any(-1)
    assert torch.isfinite(out).all()
    assert (out[~seen] == 0).all()
    assert torch.equal(torch.isneginf(lse), ~seen)
    assert_close(out[seen], plain_attention(q, k, v, mask, causal=causal, work=torch.float64)[seen], atol=1e-5)


def test_reference_rows_before_first_key_under_causal_are_empty():
    # bottom-right: with Lq == Lk and a mask that allows only the last key, every row but the last sees nothing
    q, k, v = make_qkv(1, 1, 1, 5, 5, 16, seed=0)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[:, 4] = True
    out, lse = sa.reference_attention(q, k, v, mask, causal=True, return_lse=True)
    assert torch.isneginf(lse[0, 0, :4]).all() and torch.isfinite(lse[0, 0, 4])
    assert_close(out[0, 0, 4], v[0, 0, 4], atol=1e-6)


def test_reference_scale_and_gqa_equal_repeated_kv():
    q, k, v = make_qkv(2, 6, 2, 33, 90, 64, seed=4, contiguity="strided")
    out = sa.reference_attention(q, k, v, scale=0.3)
    rep = sa.reference_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), scale=0.3)
    assert_close(out, rep, atol=1e-6)
    assert_close(out, plain_attention(q, k, v, scale=0.3, work=torch.float64), atol=1e-5)
    assert (out - sa.reference_attention(q, k, v)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_computes_in_fp32(dtype):
    q, k, v = make_qkv(2, 2, 2, 50, 80, 64, seed=9, dtype=dtype)
    out, lse = sa.reference_attention(q, k, v, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exact = plain_attention(q, k, v, work=torch.float64)
    # one rounding of an fp32 result: within half an ulp of the low-precision format (plus fp32 noise)
    ulp = torch.finfo(dtype).eps
    assert ((out.double() - exact).abs() <= ulp * exact.abs() + 1e-5).all()


def test_reference_fp64_path_is_fp64():
    q, k, v = make_qkv(1, 2, 1, 20, 45, 32, seed=2, dtype=torch.float64)
    out, lse = sa.reference_attention(q, k, v, return_lse=True)
    assert out.dtype == torch.float64
    assert_close(out, plain_attention(q, k, v, work=torch.float64), atol=1e-12, rtol=1e-12)


def test_reference_rejects_non_bool_mask():
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="mask"):
        sa.reference_attention(q, k, v, torch.ones(8, 8))
