"""Logit soft-capping (Gemma-2: ``softcap * tanh(s / softcap)`` on the scaled scores, before mask and softmax) in the
oracle, the torch and Triton backends (Triton in the interpreter on CPU), `sparse_attention`, `sparse_prefill` and
the engine entry point; dispatch around the backends that lack it."""
import importlib.util
import math
import random

import pytest
import torch

import sparse_attn as sa
from sparse_attn.integrations import sparse_attn_func
from sparse_attn.backends.triton import launcher as triton_launch
from helpers import assert_close, assert_lse_close, make_qkv, plain_attention, random_layout

CAP = 5.0          # small enough that capping changes the result for unit-variance q, k at D = 32..64 (scores ~ 1..4)
# (B, Hq, Hkv, Lq, Lk, D, contiguity): awkward lengths, Lq < Lk, GQA, MQA, non-contiguous inputs
SHAPES = {"L63": (2, 2, 2, 63, 63, 32, "contiguous"), "q65k113_gqa": (2, 4, 2, 65, 113, 64, "blhd"),
          "q1k65_mqa": (1, 4, 1, 1, 65, 32, "contiguous"), "q113k200": (1, 2, 2, 113, 200, 80, "strided")}


def capped_by_hand(q, k, v, mask, causal, cap):
    """Dense fp64 attention with the cap written out, independent of `reference_attention`'s code."""
    Hq, Hkv, Lq, Lk, D = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    kk, vv = (t.double().repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)
    s = cap * torch.tanh(s / cap)
    allowed = mask.expand(s.shape).clone()
    if causal:
        allowed &= torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)


def capped_in(work, q, k, v, mask, causal, cap):
    """The same written out in ``work`` precision end to end: the 'plain torch' baseline of the tolerance rule."""
    Hq, Hkv, Lq, Lk, D = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    kk, vv = (t.to(work).repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    s = (q.to(work) @ kk.transpose(-1, -2)) * (D ** -0.5)
    s = torch.tanh(s / cap) * cap
    allowed = mask.expand(s.shape).clone()
    if causal:
        allowed &= torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ vv


def layout_for(name, seed=0):
    B, Hq, Hkv, Lq, Lk, D, contiguity = SHAPES[name]
    q, k, v = make_qkv(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, seed=seed, contiguity=contiguity)
    layout, _, _ = random_layout(random.Random(seed), B, Hq, Lq, Lk, 64, 64)
    return q, k, v, layout


@pytest.mark.parametrize("causal", [True, False])
def test_reference_softcap_matches_the_formula_and_matters(causal):
    q, k, v, layout = layout_for("q65k113_gqa")
    q = q * 3                                                     # large scores: capping bites
    mask = layout.to_mask()
    out, lse = sa.reference_attention(q, k, v, mask, causal=causal, softcap=CAP, return_lse=True)
    hand_out, hand_lse = capped_by_hand(q, k, v, mask, causal, CAP)
    seen = torch.isfinite(hand_lse)
    assert_close(out[seen], hand_out[seen].float(), atol=1e-5)
    assert_lse_close(lse, hand_lse.float(), atol=1e-5)
    plain = sa.reference_attention(q, k, v, mask, causal=causal)
    assert (out - plain)[seen].abs().max() > 1e-2                 # the cap changes the result
    huge = sa.reference_attention(q, k, v, mask, causal=causal, softcap=1e6)
    assert_close(huge, plain, atol=1e-4)                          # a cap far above the scores is no cap


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_torch_backend_softcap_matches_oracle(shape, causal):
    q, k, v, layout = layout_for(shape, seed=1)
    q = q * 3
    out, lse = sa.sparse_attention(q, k, v, layout, causal=causal, softcap=CAP, backend="torch", return_lse=True)
    ref, ref_lse = sa.reference_attention(q, k, v, layout.to_mask(), causal=causal, softcap=CAP, return_lse=True)
    assert_close(out, ref, atol=1e-5)
    assert_lse_close(lse, ref_lse, atol=1e-5)
    # fp64 path too
    out64 = sa.sparse_attention(q.double(), k.double(), v.double(), layout, causal=causal, softcap=CAP,
                                backend="torch")
    assert_close(out64, sa.reference_attention(q.double(), k.double(), v.double(), layout.to_mask(), causal=causal,
                                               softcap=CAP), atol=1e-12)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not (
    torch.cuda.is_available() or triton_launch.interpreter_enabled()), reason="needs triton (GPU or interpreter)")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", ["L63", "q65k113_gqa", "q1k65_mqa"])
def test_triton_softcap_matches_oracle(shape, causal, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, layout = layout_for(shape, seed=2)
    q, k, v = (t.to(dtype).float() for t in (q * 3, k, v))             # the oracle sees the rounded inputs
    ref, ref_lse = sa.reference_attention(q, k, v, layout.to_mask(), causal=causal, softcap=CAP, return_lse=True)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    out, lse = sa.sparse_attention(q, k, v, layout.to(device), causal=causal, softcap=CAP, backend="triton",
                                   return_lse=True)
    if dtype == torch.float32:
        assert_close(out.cpu().float(), ref, atol=1e-4)
    else:         # FlashAttention's rule: at most 2x the error of plain capped attention done in fp16
        seen = torch.isfinite(ref_lse)[..., None].expand_as(ref)
        plain = capped_in(torch.float16, q.cpu(), k.cpu(), v.cpu(), layout.to_mask(), causal, CAP)
        base = (plain.float() - ref)[seen].abs().max()
        assert (out.cpu().float() - ref)[seen].abs().max() <= 2 * base + 1e-4
    assert_lse_close(lse.cpu(), ref_lse, atol=1e-3 if dtype == torch.float16 else 1e-4)


def test_auto_takes_a_backend_with_softcap_and_flex_refuses():
    q, k, v, layout = layout_for("L63", seed=3)
    ref = sa.reference_attention(q, k, v, layout.to_mask(), softcap=CAP)
    assert_close(sa.sparse_attention(q, k, v, layout, softcap=CAP), ref, atol=1e-5)
    assert_close(sa.sparse_attention(q, k, v, layout, softcap=CAP, backend="torch"), ref, atol=1e-5)
    with pytest.raises(ValueError, match="softcap"):
        sa.sparse_attention(q, k, v, layout, softcap=CAP, backend="flex")
    for bad in (-1.0, float("inf"), "5", True):
        with pytest.raises(ValueError, match="softcap"):
            sa.sparse_attention(q, k, v, layout, softcap=bad)


@pytest.mark.parametrize("causal", [True, False])
def test_sparse_prefill_softcap_dense_and_sparse_paths(causal):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Lq=150, Lk=300, D=32, seed=4, structured=True)
    q = q * 3
    dense = sa.sparse_prefill(q, k, v, causal=causal, softcap=CAP)          # short: dense path
    assert_close(dense, sa.reference_attention(q, k, v, causal=causal, softcap=CAP), atol=1e-5)
    pattern = sa.VerticalSlash(vertical=16, slash=32, sink=4, local=16, last_q=16)
    sparse = sa.sparse_prefill(q, k, v, pattern, causal=causal, softcap=CAP, dense_below=0)
    layout = sa.estimate(q, k, pattern, causal=causal)                     # the estimate ignores softcap
    assert_close(sparse, sa.reference_attention(q, k, v, layout.to_mask(), causal=causal, softcap=CAP), atol=1e-5)
    assert not torch.allclose(sparse, sa.sparse_prefill(q, k, v, pattern, causal=causal, dense_below=0), atol=1e-3)


def test_engine_func_softcap():
    q, k, v, layout = layout_for("q65k113_gqa", seed=5)
    q = q * 3
    index = (layout.block_count, layout.block_offset, layout.column_count, layout.column_index)
    out, lse = sparse_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *index, causal=True,
                                softcap=CAP, return_softmax_lse=True)
    ref, ref_lse = sa.reference_attention(q, k, v, layout.to_mask(), causal=True, softcap=CAP, return_lse=True)
    assert_close(out.transpose(1, 2), ref, atol=1e-5)
    assert_lse_close(lse.masked_fill(lse == float("inf"), float("-inf")), ref_lse, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None,
                    reason="needs a CUDA GPU and CuPy")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_softcap_matches_oracle(dtype):
    """Error vs the fp32 oracle within twice plain torch's in ``dtype`` on the same GPU (capped scores too)."""
    q, k, v, layout = layout_for("q65k113_gqa", seed=6)
    q = q * 3
    ref = sa.reference_attention(q, k, v, layout.to_mask(), causal=True, softcap=CAP)
    qc, kc, vc = (t.cuda().to(dtype) for t in (q, k, v))
    out = sa.sparse_attention(qc, kc, vc, layout.to("cuda"), causal=True, softcap=CAP, backend="cuda")
    plain = plain_attention(qc, kc, vc, layout.to_mask(), causal=True, softcap=CAP).float().cpu()
    seen = torch.isfinite(plain).all(-1)
    err = (out.float().cpu() - ref)[seen].abs().max().item()
    assert err <= 2 * (plain - ref)[seen].abs().max().item() + 1e-5


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_softcap_compiles_for_sm90_without_a_gpu():
    """The real compiler accepts the soft-capping specialisation (bf16, which the interpreter cannot run)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root)
    result = subprocess.run([sys.executable, os.path.join(root, "bench", "triton_compile_check.py"), "--arch", "90",
                             "--dims", "80", "--dtypes", "bf16", "--softcap"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("bf16")]
    assert len(rows) == 2 and all("regs" in r for r in rows), result.stdout
