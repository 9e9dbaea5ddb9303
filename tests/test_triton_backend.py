"""backend="triton": the Triton kernel against the fp32 oracle (`reference_attention` with the layout's mask) and
the torch backend, on awkward shapes, random unaligned layouts and the real patterns; dispatch and bad input.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors: conftest.py sets TRITON_INTERPRET=1 before
any test imports the kernel.  With a GPU the same tests run on CUDA tensors, plus the `gpu`-marked bf16 checks
(the interpreter's tl.dot is wrong for bf16)."""
import os
import random
import subprocess
import sys

import pytest
import torch

import sparse_attn as sa
from sparse_attn.backends.triton import launcher as triton_launch
from helpers import (HEAD_CONFIGS, assert_close, assert_lse_close, make_qkv, per_head_mix, plain_attention,
                      random_layout, sdpa)

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_launch.interpreter_enabled():
    pytest.skip("no GPU and TRITON_INTERPRET is off", allow_module_level=True)

# (Lq, Lk, heads, D, contiguity, block_m, block_n, dtypes): awkward lengths, Lq < Lk, every head config, padded
# head dims, non-contiguous inputs, and layout blocks narrower / wider than the kernel's steps or not powers of two.
F32, F16 = torch.float32, torch.float16
SHAPES = {
    "L1": (1, 1, "mha", 64, "blhd", 64, 64, (F32, F16)),
    "L63": (63, 63, "gqa", 80, "strided", 64, 64, (F32, F16)),
    "L65": (65, 65, "mqa", 128, "blhd", 64, 64, (F32, F16)),
    "q113k300": (113, 300, "gqa", 64, "contiguous", 64, 64, (F32, F16)),
    "q1k130": (1, 130, "mqa", 128, "contiguous", 64, 64, (F16,)),
    "q65k200_b32x16": (65, 200, "mha", 80, "strided", 32, 16, (F32,)),
    "L113_b128x128": (113, 113, "gqa", 64, "blhd", 128, 128, (F16,)),
    "q100k200_b48x40": (100, 200, "mqa", 96, "contiguous", 48, 40, (F32,)),
    "q65k130_d256": (65, 130, "gqa", 256, "blhd", 64, 64, (F16,)),
}
CASES = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
         for name, spec in SHAPES.items() for dtype in spec[-1]]
#: Smallest error allowed in low precision (one fp16 rounding of outputs around 0.1).
FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def qkv(B, hq, hkv, lq, lk, d, dtype=torch.float32, seed=0, contiguity="contiguous"):
    q, k, v = make_qkv(B, hq, hkv, lq, lk, d, dtype=dtype, seed=seed, contiguity=contiguity)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def run(q, k, v, layout, causal, backend="triton"):
    return sa.sparse_attention(q, k, v, layout, causal=causal, backend=backend, return_lse=True)


def check(q, k, v, layout, causal):
    """Triton vs the fp32 oracle (fp32: tight; 16-bit: at most 2x plain torch's error in that dtype) and vs the
    torch backend (same rows empty, LSE equal)."""
    out, lse = run(q, k, v, layout, causal)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    mask = layout.to_mask()
    exact, exact_lse = sa.reference_attention(q.float(), k.float(), v.float(), mask, causal=causal, return_lse=True)
    ref_out, ref_lse = run(q, k, v, layout, causal, backend="torch")
    if q.dtype == torch.float32:
        assert_close(out, exact, atol=1e-5)
        assert_close(out, ref_out, atol=1e-5)
    else:
        empty = torch.isneginf(exact_lse)
        assert not out[empty].any(), "rows without a visible key must be 0"
        # all in q's dtype (on the CPU: the conftest helper builds CPU masks); NaN on empty rows
        plain = plain_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal=causal).to(q.device)
        err = (out.float() - exact).abs()[~empty].max().item() if (~empty).any() else 0.0
        plain_err = (plain.float() - exact).abs()[~empty].max().item() if (~empty).any() else 0.0
        assert err <= 2 * plain_err + FLOOR[q.dtype], f"error {err:.3g} vs plain {q.dtype} torch {plain_err:.3g}"
        tol = 2e-3 if q.dtype == torch.float16 else 1e-2                # about one rounding of the output
        assert_close(out, ref_out, atol=tol, rtol=tol, what="triton vs torch backend")
    assert_lse_close(lse, exact_lse, atol=1e-4)
    assert_lse_close(lse, ref_lse, atol=1e-4)
    return out, lse


# ---------------------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape, dtype", CASES)
def test_random_unaligned_layouts_match_oracle(shape, dtype, causal):
    lq, lk, heads, d, contiguity, bm, bn, _ = SHAPES[shape]
    hq, hkv = HEAD_CONFIGS[heads]
    q, k, v = qkv(2, hq, hkv, lq, lk, d, dtype, seed=lq + d, contiguity=contiguity)
    layout, _, _ = random_layout(random.Random(lq * 7 + lk), 2, hq, lq, lk, bm, bn)   # junk in the padding
    check(q, k, v, layout.to(DEVICE), causal)


def small_patterns(n_heads):
    """The real pattern families at budgets small enough to be sparse at ~220 keys."""
    return {"ashape": sa.AShape(sink=8, local=32), "vslash": sa.VerticalSlash(vertical=16, slash=64, sink=4, local=32),
            "vslash_gamma": sa.VerticalSlash(vertical=32, slash=128, gamma=0.8, sink=4, local=32, min_vertical=8,
                                             min_slash=64),
            "block_topk": sa.BlockSparse(top_k=2), "block_gamma": sa.BlockSparse(gamma=0.5),
            "mix": per_head_mix(n_heads, 220)}


@pytest.mark.parametrize("name, causal", [(n, True) for n in small_patterns(2)] + [("vslash", False),
                                                                                    ("block_topk", False)])
def test_estimated_patterns_match_oracle(name, causal):
    q, k, v = qkv(2, 2, 1, 100, 220, 64, seed=5)
    layout = sa.estimate(q, k, small_patterns(2)[name], causal=causal)
    assert layout.density(causal) < 0.97
    check(q, k, v, layout, causal)


def test_estimated_vertical_slash_small_blocks_fp16():
    q, k, v = qkv(2, 2, 1, 113, 200, 80, torch.float16, seed=6, contiguity="blhd")
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=16, slash=64, sink=4, local=32), block_m=32, block_n=32)
    assert layout.column_count.any() and layout.density() < 0.9
    check(q, k, v, layout, True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_full_cover_equals_dense(causal):
    """Unaligned tiles from key 10 on plus columns 0..9 cover every key: the result is dense attention."""
    B, H, lq, lk = 2, 2, 70, 200
    q, k, v = qkv(B, H, 1, lq, lk, 64, seed=8)
    n_qb, starts = 2, list(range(10, lk, 64))
    layout = sa.SparseLayout(torch.full((B, H, n_qb), len(starts), dtype=torch.int32),
                             torch.tensor(starts, dtype=torch.int32).expand(B, H, n_qb, -1).contiguous(),
                             torch.full((B, H, n_qb), 10, dtype=torch.int32),
                             torch.arange(10, dtype=torch.int32).flip(0).expand(B, H, n_qb, -1).contiguous(),
                             q_len=lq, k_len=lk).to(DEVICE)
    out = sa.sparse_attention(q, k, v, layout, causal=causal, backend="triton")
    assert_close(out.cpu(), sdpa(q.cpu(), k.cpu(), v.cpu(), causal=causal), atol=1e-5)


def test_rows_without_visible_keys_give_zero_and_minus_inf():
    """Block 0 lists nothing, block 1 only a tile after its rows (causal): output 0, LSE -inf, as torch."""
    q, k, v = qkv(2, 2, 2, 130, 130, 64, seed=9)
    bc = torch.tensor([0, 1, 1], dtype=torch.int32).expand(2, 2, 3).contiguous()
    bo = torch.tensor([[5], [128], [0]], dtype=torch.int32).expand(2, 2, 3, 1).contiguous()
    cc = torch.zeros(2, 2, 3, dtype=torch.int32)
    layout = sa.SparseLayout(bc, bo, cc, torch.zeros(2, 2, 3, 0, dtype=torch.int32), q_len=130,
                             k_len=130).to(DEVICE)
    out, lse = check(q, k, v, layout, True)
    assert not out[:, :, :128].any() and torch.isneginf(lse[:, :, :128]).all()
    assert torch.isfinite(lse[:, :, 128:]).all()


def test_empty_query_and_launch_heuristic():
    q, k, v = qkv(1, 2, 1, 0, 5, 64)
    empty = sa.SparseLayout(*(torch.zeros(1, 2, 0, *w, dtype=torch.int32) for w in ((), (1,), (), (1,))),
                            q_len=0, k_len=5).to(DEVICE)
    out, lse = triton_launch.triton_sparse_attention(q, k, v, empty, return_lse=True)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)
    for d in (16, 64, 80, 96, 128, 256):
        for dtype in triton_launch.TRITON_DTYPES:
            for bm, bn in ((1, 1), (48, 40), (64, 64), (128, 512)):
                cfg = triton_launch.launch_config(d, dtype, bm, bn)
                for name in ("BLOCK_D", "BLOCK_M", "BLOCK_N"):        # tl.arange / tl.dot: powers of two >= 16
                    assert cfg[name] >= 16 and cfg[name] & (cfg[name] - 1) == 0, (name, cfg)
                assert cfg["BLOCK_D"] >= d and cfg["BLOCK_M"] <= max(16, 2 * bm) and cfg["BLOCK_N"] <= max(16, 2 * bn)


# ---------------------------------------------------------------------------------------------------- dispatch
def test_auto_runs_torch_on_cpu_and_triton_is_the_explicit_choice(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 65, 65, 64, seed=10)
    layout = sa.estimate(q, k, sa.AShape(sink=4, local=16))
    calls = []
    original = triton_launch.triton_sparse_attention
    monkeypatch.setattr(triton_launch, "triton_sparse_attention",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    auto = sa.sparse_attention(q, k, v, layout, backend="auto")
    assert calls == []
    if DEVICE == "cpu":
        explicit = sa.sparse_attention(q, k, v, layout, backend="triton")
        assert calls == [1]
        assert_close(explicit, auto, atol=1e-5)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 2, 1, 65, 65, 64, seed=11)
    layout = sa.estimate(q, k, sa.AShape(sink=4, local=16))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sa.sparse_attention(q, k, v, layout, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):                    # even where it would run dense
        sa.sparse_prefill(q, k, v, backend="triton")


def test_import_does_not_import_triton():
    code = ("import sys, torch, sparse_attn as sa; q = torch.randn(1, 2, 70, 64); "
            "sa.sparse_attention(q, q, q, sa.estimate(q, q, sa.AShape(sink=4, local=16))); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_names_every_reason_at_once(monkeypatch):
    monkeypatch.setattr(triton_launch, "triton_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 65, 12, dtype=torch.float64)
    layout = sa.SparseLayout(torch.zeros(1, 2, 1, dtype=torch.int32), torch.zeros(1, 2, 1, 1, dtype=torch.int32),
                             torch.zeros(1, 2, 1, dtype=torch.int32), torch.zeros(1, 2, 1, 1, dtype=torch.int32),
                             q_len=65, k_len=65, block_m=65, block_n=1024)
    with pytest.raises(ValueError) as err:
        triton_launch.triton_sparse_attention(q, q, q, layout)
    message = str(err.value)
    for reason in ("triton is not installed", "TRITON_INTERPRET=1", "dtype must be float16, bfloat16 or float32",
                   "head_dim must be a multiple of 8", "layout.block_n must be <= 512"):
        assert reason in message, (reason, message)


def test_bad_input_reasons_include_the_common_checks():
    q = torch.randn(1, 3, 65, 64)
    k = torch.randn(1, 2, 60, 64)
    reasons = triton_launch.triton_not_supported_reasons(q, k, k)
    assert any("multiple of k/v heads" in r for r in reasons) and any("<= k seq_len" in r for r in reasons)
    q = q.to(DEVICE)
    assert triton_launch.triton_not_supported_reasons(q, q, q) == []


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter-only limitation")
def test_bf16_is_refused_under_the_interpreter():
    q = torch.randn(1, 2, 65, 64, dtype=torch.bfloat16)
    reasons = triton_launch.triton_not_supported_reasons(q, q, q)
    assert len(reasons) == 1 and "bfloat16" in reasons[0]


def test_kernel_compiles_for_sm90_without_a_gpu():
    """The real compiler (not the interpreter) accepts the kernel: bf16 (which the interpreter cannot run) at a
    padded head dim, causal and not, down to a cubin with triton's ptxas."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root, TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, os.path.join(root, "bench", "triton_compile_check.py"), "--arch", "90",
                             "--dims", "80", "--dtypes", "bf16"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("bf16")]
    assert len(rows) == 2 and all("regs" in r for r in rows), result.stdout


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["L63", "q113k300", "q65k130_d256"])
def test_bf16_on_gpu_matches_oracle(shape):
    lq, lk, heads, d, contiguity, bm, bn, _ = SHAPES[shape]
    hq, hkv = HEAD_CONFIGS[heads]
    q, k, v = qkv(2, hq, hkv, lq, lk, d, torch.bfloat16, seed=12, contiguity=contiguity)
    layout, _, _ = random_layout(random.Random(12), 2, hq, lq, lk, bm, bn)
    check(q, k, v, layout.to(DEVICE), True)


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda(monkeypatch):
    q, k, v = qkv(1, 2, 1, 130, 130, 64, torch.float16, seed=13)
    layout = sa.estimate(q, k, sa.AShape(sink=4, local=16))
    calls = []
    original = triton_launch.triton_sparse_attention
    monkeypatch.setattr(triton_launch, "triton_sparse_attention",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    sa.sparse_attention(q, k, v, layout)
    assert calls == [1]
    sa.sparse_attention(q.double(), k.double(), v.double(), layout)      # fp64: not a Triton dtype -> torch
    assert calls == [1]
