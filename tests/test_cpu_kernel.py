"""The compiled CPU kernel's own concerns: how it is chosen, built and identified, and what the oracle tests of
`test_torch_backend.py` (which run every case, random layouts with shuffled tiles included, on it too) do not
reach: extreme scores and thread counts."""
import pytest
import torch

import sparse_attn as sa
from sparse_attn import prefill
from sparse_attn.ops import cpu_kernel
from conftest import assert_close, assert_lse_close, make_qkv

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="the compiled CPU kernel cannot be built here")


def oracle(q, k, v, layout, causal, scale=None):
    return sa.reference_attention(q, k, v, layout.to_mask(), causal=causal, return_lse=True, scale=scale)


def test_auto_picks_the_kernel_on_cpu_float_inputs_and_torch_for_fp64(monkeypatch):
    q32 = torch.zeros(1, 2, 8, 16)
    monkeypatch.setattr(cpu_kernel, "available", lambda: True)
    assert prefill._resolve_backend("auto", q32, q32, q32) == "cpu"
    assert prefill._resolve_backend("auto", q32.half(), q32, q32) == "cpu"
    assert prefill._resolve_backend("auto", q32.double(), q32, q32) == "torch"
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    assert prefill._resolve_backend("auto", q32, q32, q32) == "torch"


def test_explicit_cpu_backend_refuses_fp64_naming_the_backend():
    q, k, v = make_qkv(1, 2, 1, 70, 70, 16, seed=0, dtype=torch.float64)
    layout = sa.estimate(q, k, sa.AShape(sink=16, local=32))
    with pytest.raises(ValueError, match="backend='cpu'.*float64"):
        sa.sparse_attention(q, k, v, layout, backend="cpu")


def test_turned_off_kernel_falls_back_to_torch_and_explicit_request_says_why(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_CPU_KERNEL", "0")
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is None and not cpu_kernel.available()
        q, k, v = make_qkv(1, 2, 1, 100, 100, 16, seed=1)
        layout = sa.estimate(q, k, sa.AShape(sink=16, local=32))
        out = sa.sparse_attention(q, k, v, layout)                 # auto: the torch backend
        assert_close(out, oracle(q, k, v, layout, True)[0], atol=1e-5)
        with pytest.raises(RuntimeError, match="backend='cpu'.*unavailable"):
            sa.sparse_attention(q, k, v, layout, backend="cpu")
    finally:
        monkeypatch.delenv("SPARSE_ATTN_CPU_KERNEL")
        cpu_kernel.load.cache_clear()


def test_build_name_changes_with_source_flags_torch_and_cpu():
    base = cpu_kernel.build_name(b"source", cpu="flags: avx2")
    assert base == cpu_kernel.build_name(b"source", cpu="flags: avx2")
    assert base != cpu_kernel.build_name(b"source2", cpu="flags: avx2")
    assert base != cpu_kernel.build_name(b"source", flags=("-O2",), cpu="flags: avx2")
    assert base != cpu_kernel.build_name(b"source", torch_version="0.0", cpu="flags: avx2")
    assert base != cpu_kernel.build_name(b"source", cpu="flags: avx2 avx512f")


def test_source_ships_where_the_loader_looks():
    assert cpu_kernel.source_path().read_text().count("TORCH_LIBRARY(sparse_attn_cpu") == 1


@needs_kernel
def test_extreme_scores_stay_finite_and_match_the_oracle():
    """Scores far outside [-87, 87] (the exp's clamped range) before the max is taken off."""
    q, k, v = make_qkv(1, 2, 1, 200, 200, 64, seed=4)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=16, slash=64, sink=4, local=64))
    for scale in (4.0, 1e-4):
        out, lse = sa.sparse_attention(q, k, v, layout, scale=scale, backend="cpu", return_lse=True)
        ref, ref_lse = oracle(q, k, v, layout, True, scale=scale)
        assert torch.isfinite(out).all()
        assert_close(out, ref, atol=1e-4)
        assert_lse_close(lse, ref_lse, atol=1e-4 * max(1.0, float(ref_lse.abs().max())))


@needs_kernel
def test_thread_count_does_not_change_the_result():
    q, k, v = make_qkv(2, 4, 2, 700, 700, 64, seed=5)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=32, slash=128, sink=4, local=64))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sa.sparse_attention(q, k, v, layout, backend="cpu")
        torch.set_num_threads(2)
        two = sa.sparse_attention(q, k, v, layout, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
