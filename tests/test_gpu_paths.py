"""The paths a user reaches on a CUDA device, end to end (marker ``gpu``; skipped without CUDA): the default pattern's
online estimate with the Triton score kernels, ``backend="auto"`` choosing Triton, ``out=`` on the GPU backends, a
patched Hugging Face model (eager and compiled through the custom op) and the differentiable training path.  Each is
checked against the dense fp32 oracle on the CPU, on odd shapes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import sparse_attn as sa
from sparse_attn.errors import NotSupportedError
from helpers import make_qkv, plain_attention
from sparse_attn.estimators import score_backends
from sparse_attn.tools.synthetic import Workload
from sparse_attn.tools.synthetic import make_qkv as make_workload

pytestmark = pytest.mark.gpu

WORKLOADS = [  # B, Hq, Hkv, L, q_len, D: batch rows with different content, GQA / MQA / MHA, Lq < Lk, off the grid
    (2, 4, 2, 1500, None, 64),
    (1, 8, 1, 2100, 333, 128),
    (2, 4, 4, 1000, None, 80),
]


def _on_cuda(*tensors):
    return [t.cuda() for t in tensors]


def _oracle_errors(out, q, k, v, layout, dtype):
    """(error of ``out`` vs the fp32 oracle, error of plain torch in ``dtype`` on the GPU) over rows that see a key."""
    mask = layout.to("cpu").to_mask()
    ref = sa.reference_attention(q.float(), k.float(), v.float(), mask, causal=True)
    plain = plain_attention(*(t.to(dtype).cuda() for t in (q, k, v)), mask, causal=True).float().cpu()
    seen = torch.isfinite(plain).all(-1)
    return (out.float().cpu() - ref)[seen].abs().max().item(), (plain - ref)[seen].abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", WORKLOADS, ids=lambda s: "x".join(map(str, s)))
def test_default_pattern_estimates_and_runs_on_cuda(shape, dtype, monkeypatch):
    """The synthetic workload (sinks, local bands, needles, a periodic comb), on which the default pattern keeps
    sparse heads, so the sample really is scored (on random inputs every head goes dense before scoring)."""
    B, Hq, Hkv, L, q_len, D = shape
    q, k, v = make_workload(Workload(batch=B, q_heads=Hq, kv_heads=Hkv, seq_len=L, q_len=q_len, head_dim=D, seed=L))
    qc, kc, vc = _on_cuda(q.to(dtype), k.to(dtype), v.to(dtype))
    assert score_backends.select_scores("auto", qc, kc).name == "triton"
    layout = sa.estimate(qc, kc)                                   # the default pattern, online
    assert layout.block_count.is_cuda and 0 < layout.density() < 0.6
    calls = []
    real = score_backends.TRITON_SCORES.run
    monkeypatch.setattr(score_backends.TRITON_SCORES, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    again = sa.estimate(qc, kc)
    assert calls, "the default estimate on CUDA did not score the sample with the Triton kernels"
    assert torch.equal(again.block_count, layout.block_count)      # deterministic on the same inputs
    out = sa.sparse_attention(qc, kc, vc, layout)
    assert out.is_cuda and out.dtype == dtype
    err, plain_err = _oracle_errors(out, q.to(dtype), k.to(dtype), v.to(dtype), layout, dtype)
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)


def _gpu_backends():
    names = ["triton"]
    if importlib.util.find_spec("cupy") is not None:
        names.append("cuda")
    return names


@pytest.mark.parametrize("backend", _gpu_backends())
def test_out_on_gpu_backends_receives_the_result_and_nothing_else(backend):
    Hq, Hkv, Lq, Lk, D = 4, 2, 113, 300, 64
    q, k, v = _on_cuda(*make_qkv(1, Hq, Hkv, Lq, Lk, D, seed=3, dtype=torch.float16))
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=64, slash=128, min_vertical=16, min_slash=64))
    expected, lse = sa.sparse_attention(q, k, v, layout, backend=backend, return_lse=True)
    buffer = torch.full((3 + Lq + 3, Hq, D), float("nan"), dtype=q.dtype, device="cuda")
    rows = buffer[3:3 + Lq].transpose(0, 1).unsqueeze(0)          # an engine's [tokens, Hq, D] rows as BHLD
    got, got_lse = sa.sparse_attention(q, k, v, layout, backend=backend, return_lse=True, out=rows)
    assert got.data_ptr() == rows.data_ptr()
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_lse, lse, rtol=0, atol=0)
    assert buffer[:3].isnan().all() and buffer[-3:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flex_backend_on_cuda_matches_oracle(dtype):
    """backend="flex" on an aligned layout: the compiled GPU kernel's tiles must divide the layout's 64-key blocks."""
    q, k, v = make_qkv(2, 4, 2, 300, 300, 64, seed=7, structured=True)
    layout = sa.estimate(q, k, sa.BlockSparse(top_k=2))
    assert layout.is_block_aligned() and layout.density() < 0.9
    out = sa.sparse_attention(*(t.to(dtype).cuda() for t in (q, k, v)), layout.to("cuda"), backend="flex")
    err, plain_err = _oracle_errors(out, q.to(dtype), k.to(dtype), v.to(dtype), layout, dtype)
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)


def test_flex_backend_on_cuda_refuses_blocks_its_tiles_cannot_divide():
    q, k, v = _on_cuda(*make_qkv(1, 2, 1, 200, 200, 64, seed=8))
    layout = sa.estimate(q, k, sa.BlockSparse(top_k=1), block_n=40)
    with pytest.raises(NotSupportedError, match="block_n=40.*divisible by 16"):
        sa.sparse_attention(q, k, v, layout, backend="flex")


def test_differentiable_path_on_cuda_matches_oracle_gradients():
    from sparse_attn.backends.torch.differentiable import differentiable_sparse_attention

    q, k, v = make_qkv(2, 4, 2, 150, 150, D=32, seed=5, structured=True)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=4, slash=16, sink=2, local=8, last_q=16))
    assert layout.density() < 0.9
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    leaves = [t.detach().cuda().requires_grad_() for t in (q, k, v)]
    out = differentiable_sparse_attention(*leaves, layout.to("cuda"), causal=True, scale=32 ** -0.5)
    got = torch.autograd.grad(out, leaves, grad_out.cuda())
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sa.reference_attention(*ref_leaves, layout.to_mask(), causal=True, scale=32 ** -0.5)
    want = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_patched_hf_model_on_cuda_eager_and_compiled():
    pytest.importorskip("transformers")
    import sparse_attn.hf as sah
    from sparse_attn.tools.tiny_model import tiny_llama

    ids = torch.randint(1, 128, (2, 200), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :29] = 0                                                # a left-padded row
    with torch.no_grad():
        dense = tiny_llama(hidden=64, vocab=128, max_positions=512).cuda()(ids, attention_mask=mask).logits
        full = sah.patch(tiny_llama(hidden=64, vocab=128, max_positions=512).cuda(),
                         sa.VerticalSlash(vertical=10**6, slash=10**6), dense_below=0, dense_above=1.0)
        torch.testing.assert_close(full(ids, attention_mask=mask).logits, dense, rtol=1e-4, atol=1e-4)
        densities = []
        sparse = sah.patch(tiny_llama(hidden=64, vocab=128, max_positions=512).cuda(),
                           sa.VerticalSlash(vertical=8, slash=64, sink=4, local=16), dense_below=0,
                           on_layout=lambda i, lay, d: densities.append(d))
        eager = sparse(ids, attention_mask=mask).logits
        assert densities and min(densities) < 0.9 and torch.isfinite(eager).all()
        torch._dynamo.reset()
        compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)(ids, attention_mask=mask).logits
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
