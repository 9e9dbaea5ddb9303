"""pytest set-up for the sparse_attn tests: the Triton interpreter switch, the hypothesis profile, the GPU marker
and the shared fixtures.  Helper functions live in the importable `helpers.py` (and `cuda_helpers.py`)."""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.  @triton.jit chooses interpreted or
# compiled code when the kernel module is imported, so the switch is set here, before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("sparse_attn", deadline=None, max_examples=40, derandomize=True, database=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sparse_attn"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# In torch 2.13.0 (CPU) the first multi-threaded fp32 exp of a process is sometimes off by about 1e-4 (3 of 20 fresh
# processes; later calls are right, and none of 40 went wrong after one warm-up call).  Without this a test's first
# oracle or torch-backend call could fail at atol 1e-5 for no fault of the code under test.
torch.randn(1 << 16).exp()



def pytest_collection_modifyitems(config, items):
    """The one GPU marker (`@pytest.mark.gpu`) skips by itself where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return random.Random(1234)
