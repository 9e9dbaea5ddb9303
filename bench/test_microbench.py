"""pytest-benchmark microbenchmarks: `python -m pytest bench/ --benchmark-only` (not part of the test run)."""
import pytest

import sparse_attn as sa
from sparse_attn.backends.cpu import loader as cpu_kernel
from sparse_attn.tools.synthetic import Workload, make_qkv

L = 8192
PATTERNS = {"ashape": sa.AShape(sink=128, local=1024), "vs": sa.VerticalSlash(vertical=512, slash=1024),
            "default": sa.DEFAULT_PATTERN,
            "block": sa.BlockSparse(top_k=16)}


@pytest.fixture(scope="module")
def qkv():
    return make_qkv(Workload(seq_len=L))


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_estimate(benchmark, qkv, name):
    q, k, _ = qkv
    benchmark(sa.estimate, q, k, PATTERNS[name])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_attention(benchmark, qkv, name, backend):
    if backend == "cpu" and not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel cannot be built here")
    q, k, v = qkv
    layout = sa.estimate(q, k, PATTERNS[name])
    benchmark(sa.sparse_attention, q, k, v, layout, backend=backend, check_layout=False)


def test_dense_sdpa(benchmark, qkv):
    q, k, v = qkv
    benchmark(sa.dense_attention, q, k, v)
