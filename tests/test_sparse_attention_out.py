"""``sparse_attention(..., out=)``: the output written into a caller's buffer (an engine's ``[tokens, Hq, D]`` rows
viewed as BHLD), in place by the compiled CPU kernel and copied in by the other backends, equal to the result
without ``out``; rows outside the view untouched; a buffer of the wrong shape, dtype or strides refused by name."""
import pytest
import torch

import sparse_attn as sa
from sparse_attn.backends.cpu import loader as cpu_kernel
from helpers import assert_close, make_qkv


def _engine_rows(Lq, Hq, D, dtype, pad=3):
    """A NaN-filled ``[pad + Lq + pad, Hq, D]`` buffer and its middle rows as ``[1, Hq, Lq, D]`` (non-contiguous)."""
    buffer = torch.full((pad + Lq + pad, Hq, D), float("nan"), dtype=dtype)
    return buffer, buffer[pad:pad + Lq].transpose(0, 1).unsqueeze(0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_receives_the_result_and_nothing_else(backend, dtype):
    if backend == "cpu" and not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel cannot be built here")
    Hq, Hkv, Lq, Lk, D = 4, 2, 113, 300, 64                  # GQA, Lq < Lk, lengths not multiples of the block
    q, k, v = make_qkv(1, Hq, Hkv, Lq, Lk, D, seed=3, dtype=dtype)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=64, slash=128, min_vertical=16, min_slash=64))
    expected, lse = sa.sparse_attention(q, k, v, layout, backend=backend, return_lse=True)
    buffer, rows = _engine_rows(Lq, Hq, D, dtype)
    got, got_lse = sa.sparse_attention(q, k, v, layout, backend=backend, return_lse=True, out=rows)
    assert got.data_ptr() == rows.data_ptr() and got.stride() == rows.stride()
    assert_close(rows, expected, atol=0, rtol=0)              # the same kernel, only the destination differs
    assert_close(got_lse, lse, atol=0, rtol=0)
    assert buffer[:3].isnan().all() and buffer[-3:].isnan().all()
    dense = sa.reference_attention(q, k, v, layout.to_mask())
    assert_close(rows.float(), dense, atol=2e-2 if dtype == torch.bfloat16 else 2e-5, rtol=0)


@pytest.mark.parametrize("bad, what", [
    (lambda q: torch.empty(q.shape[0], q.shape[1], q.shape[2] + 1, q.shape[3]), "shaped"),
    (lambda q: torch.empty_like(q, dtype=torch.float64), "float64"),
    (lambda q: torch.empty(q.shape[::-1]).permute(3, 2, 1, 0), "strides"),
    (lambda q: q.numpy(), "torch.Tensor"),
    (lambda q: q, "share memory with q"),
])
def test_bad_out_is_refused_naming_it(bad, what):
    q, k, v = make_qkv(1, 2, 1, 70, 70, 16, seed=0)
    layout = sa.estimate(q, k, sa.AShape(sink=16, local=32))
    with pytest.raises((ValueError, TypeError), match=f"out.*{what}|{what}.*out"):
        sa.sparse_attention(q, k, v, layout, out=bad(q))
