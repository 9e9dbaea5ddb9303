"""`DenseMemory`: which requests a layer sent back to vLLM, for their later chunks (no vLLM needed: main suite)."""
import torch

from sparse_attn.integrations.vllm.dense_memory import RECHECK_GROWTH, DenseMemory

BLOCK = 128


def _row(*ids, pad=8):
    return torch.tensor(list(ids) + [0] * pad, dtype=torch.int32)


def test_later_chunks_of_the_same_request_until_the_key_length_grows():
    memory = DenseMemory()
    row = _row(7, 3, 9, 4, 11, 2, 5, 6)               # a request's blocks, growing with its chunks
    assert not memory.is_dense(row, 300)
    memory.remember(row, 300, BLOCK)                  # 3 blocks: 7, 3, 9
    assert memory.is_dense(row, 300)
    assert memory.is_dense(row, 500)                  # the next chunk
    assert not memory.is_dense(row, RECHECK_GROWTH * 300)     # grown enough: decide again
    assert not memory.is_dense(row, 200)              # shorter than at the decision: not that request's state


def test_other_requests_are_not_taken_for_it():
    memory = DenseMemory()
    memory.remember(_row(7, 3, 9), 300, BLOCK)
    assert not memory.is_dense(_row(8, 3, 9), 300)     # another first block
    assert not memory.is_dense(_row(7, 3, 10), 300)    # shares the first blocks (prefix hit), then differs
    assert memory.is_dense(_row(7, 3, 9, 12), 400)     # shares every block the decision saw: the same keys


def test_bounded():
    memory = DenseMemory(capacity=4)
    for first in range(10):
        memory.remember(_row(first, 1), 200, BLOCK)
        assert len(memory) <= 4
    assert memory.is_dense(_row(9, 1), 200)
