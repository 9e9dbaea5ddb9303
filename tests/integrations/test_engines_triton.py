"""Engine entry points with backend="triton" equal backend="torch" (and the oracle): under TRITON_INTERPRET=1 on
CPU tensors (conftest.py switches it on without a GPU), on CUDA tensors where a GPU is present."""
import random

import pytest
import torch

import sparse_attn as sa
from sparse_attn.integrations import (convert_vertical_slash_indexes, sparse_attn_func, sparse_attn_varlen_func,
                                      sparse_prefill_varlen)
from sparse_attn.backends.triton import launcher as triton_launch
from helpers import assert_close, make_qkv, random_layout

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_launch.interpreter_enabled():
    pytest.skip("no GPU and TRITON_INTERPRET is off", allow_module_level=True)

# (Lq, Lk, Hq, Hkv): square, Lq < Lk with GQA, a single query with MQA
SHAPES = {"sq130": (130, 130, 2, 2), "q70k200_gqa": (70, 200, 4, 2), "q1k65_mqa": (1, 65, 2, 1)}


def blhd(*ts):
    return [t.transpose(1, 2).to(DEVICE) for t in ts]


def index_of(layout):
    return [t.to(DEVICE) for t in (layout.block_count, layout.block_offset, layout.column_count, layout.column_index)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_func_triton_equals_torch_and_oracle(shape, causal):
    Lq, Lk, Hq, Hkv = SHAPES[shape]
    q, k, v = make_qkv(B=2, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=32, seed=21)
    layout, _, _ = random_layout(random.Random(Lq + Lk), 2, Hq, Lq, Lk, 64, 64)
    args = (*blhd(q, k, v), *index_of(layout))
    out, lse = sparse_attn_func(*args, causal=causal, return_softmax_lse=True, backend="triton")
    ref, ref_lse = sparse_attn_func(*args, causal=causal, return_softmax_lse=True, backend="torch")
    assert out.shape == (2, Lq, Hq, 32) and lse.shape == (2, Hq, Lq)
    assert_close(out, ref, atol=1e-5)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))                # rows with no key: +inf
    assert_close(lse[~torch.isinf(lse)], ref_lse[~torch.isinf(ref_lse)], atol=1e-5)
    exact = sa.reference_attention(q, k, v, layout.to_mask(), causal=causal)
    assert_close(out.transpose(1, 2).cpu(), exact, atol=1e-5)


def test_func_triton_on_converted_vertical_slash_index():
    q, k, v = make_qkv(B=1, Hq=2, Hkv=1, Lq=150, Lk=220, D=64, seed=22, dtype=torch.float16)
    vert = torch.tensor([[0, 5, 100], [7, 8, 219]], dtype=torch.int32)[None]
    slash = torch.tensor([[90, 1, 0], [200, 64, 2]], dtype=torch.int32)[None]
    idx = convert_vertical_slash_indexes(torch.tensor([150], dtype=torch.int32), torch.tensor([220], dtype=torch.int32),
                                         vert, slash, 256, 64, 64)
    args = (*blhd(q, k, v), *(t.to(DEVICE) for t in idx))
    out = sparse_attn_func(*args, causal=True, backend="triton")
    ref = sparse_attn_func(*args, causal=True, backend="torch")
    assert out.dtype == torch.float16
    assert_close(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_func_triton_equals_torch(causal):
    q_lens, k_lens = (70, 1, 130), (70, 65, 200)
    gen = torch.Generator().manual_seed(23)
    q = torch.randn(sum(q_lens), 4, 32, generator=gen).to(DEVICE)
    k, v = (torch.randn(sum(k_lens), 2, 32, generator=gen).to(DEVICE) for _ in range(2))
    cu_q = torch.tensor([0, 70, 71, 201], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 70, 135, 335], dtype=torch.int32, device=DEVICE)
    layouts = [random_layout(random.Random(i), 1, 4, lq, lk, 64, 64)[0] for i, (lq, lk) in enumerate(zip(q_lens,
                                                                                                        k_lens))]
    idx = _stack(layouts, n_qb=3)                                      # one entry per sequence, ceil(130 / 64) rows
    args = (q, k, v, *(t.to(DEVICE) for t in idx), cu_q, cu_k, 130, 200)
    out, lse = sparse_attn_varlen_func(*args, causal=causal, return_softmax_lse=True, backend="triton")
    ref, ref_lse = sparse_attn_varlen_func(*args, causal=causal, return_softmax_lse=True, backend="torch")
    assert_close(out, ref, atol=1e-5)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))                # rows with no key: +inf
    assert_close(lse[~torch.isinf(lse)], ref_lse[~torch.isinf(ref_lse)], atol=1e-5)


def _stack(layouts, n_qb):
    """Batch-1 layouts as one index entry per sequence, padded to ``n_qb`` query blocks and the widest entry."""
    pad = torch.nn.functional.pad
    nb = max(l.block_offset.shape[-1] for l in layouts)
    nc = max(l.column_index.shape[-1] for l in layouts)
    rows = [n_qb - l.num_query_blocks for l in layouts]
    return (torch.cat([pad(l.block_count, (0, r)) for l, r in zip(layouts, rows)]),
            torch.cat([pad(l.block_offset, (0, nb - l.block_offset.shape[-1], 0, r)) for l, r in zip(layouts, rows)]),
            torch.cat([pad(l.column_count, (0, r)) for l, r in zip(layouts, rows)]),
            torch.cat([pad(l.column_index, (0, nc - l.column_index.shape[-1], 0, r)) for l, r in zip(layouts, rows)]))


def test_prefill_varlen_triton_equals_torch():
    gen = torch.Generator().manual_seed(24)
    q = torch.randn(201, 4, 32, generator=gen).to(DEVICE)
    k, v = (torch.randn(335, 2, 32, generator=gen).to(DEVICE) for _ in range(2))
    cu_q = torch.tensor([0, 70, 71, 201], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 70, 135, 335], dtype=torch.int32, device=DEVICE)
    pattern = sa.VerticalSlash(vertical=16, slash=64, sink=4, local=32, last_q=16)
    args = (q, k, v, cu_q, cu_k, 130, 200, pattern)
    out = sparse_prefill_varlen(*args, dense_below=0, backend="triton")
    ref = sparse_prefill_varlen(*args, dense_below=0, backend="torch")
    assert_close(out, ref, atol=1e-5)
