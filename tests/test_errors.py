"""Argument errors from every part of the package are the package's own classes (and still ValueError/TypeError)."""
import pytest
import torch

import sparse_attn as sa
from sparse_attn.errors import InvalidArgumentError, InvalidTypeError, SparseAttnError
from sparse_attn.retrieval import RetrievalKVCache, retrieval_attention


@pytest.mark.parametrize("call, expected", [
    (lambda: sa.VerticalSlash(vertical=-1), InvalidArgumentError),
    (lambda: sa.estimate(torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16), sa.Dense()), InvalidArgumentError),
    (lambda: sa.sparse_prefill(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16),
                               backend="nope"), InvalidArgumentError),
    (lambda: retrieval_attention(torch.randn(1, 2, 1, 16), RetrievalKVCache(index="exact"), top_k=0),
     InvalidArgumentError),
    (lambda: RetrievalKVCache(index=3.5), InvalidTypeError),
])
def test_argument_errors_are_package_errors(call, expected):
    with pytest.raises(expected) as info:
        call()
    assert isinstance(info.value, SparseAttnError)
    assert isinstance(info.value, (ValueError, TypeError))
