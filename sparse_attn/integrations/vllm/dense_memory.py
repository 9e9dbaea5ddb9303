"""Per layer: the requests whose prefill that layer sent back to vLLM's attention, so that the later prefill chunks
of the same request skip the decision (the read of its keys and the density check, or a whole estimate) until its
key length has grown `RECHECK_GROWTH`-fold.  With vLLM's default chunked prefill (4096-token chunks for ``LLM``,
2048 for the API server) a diffuse 32K prompt would otherwise pay the decision in every one of its 8-16 chunks, over
ever more keys; this way it pays it at about 4K, 8K, 16K and 32K keys.

A request is known by its block table: the block holding its first key and the block holding its last key at the
decision (blocks stay with a request until it ends; a prefix-cache hit shares only full blocks, which hold the same
keys).  Only "dense" is remembered, and dense attention is exact: an entry that outlives its request and matches a
new one by chance costs speed, never accuracy."""
from __future__ import annotations

import torch

from ...layout import ceil_div

#: re-decide once a request's key length reaches this multiple of the length at its last decision: attention that
#: is too diffuse at 4K keys is usually still so at 8K, but a layer may become sparse enough as keys grow
RECHECK_GROWTH = 2


class DenseMemory:
    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._entries: dict[int, tuple[int, int, int]] = {}     # first block -> (blocks, last block, key length)

    def __len__(self) -> int:
        return len(self._entries)

    def is_dense(self, block_ids: torch.Tensor, seq_len: int) -> bool:
        """Whether the request with block table row ``block_ids`` and ``seq_len`` keys was sent dense at a key length
        within ``[seq_len / RECHECK_GROWTH, seq_len]``."""
        entry = self._entries.get(int(block_ids[0]))
        if entry is None:
            return False
        blocks, last_block, length = entry
        return length <= seq_len < RECHECK_GROWTH * length and int(block_ids[blocks - 1]) == last_block

    def remember(self, block_ids: torch.Tensor, seq_len: int, block_size: int) -> None:
        """The request with block table row ``block_ids`` went dense at ``seq_len`` keys."""
        if len(self._entries) >= self.capacity:          # finished requests are never announced: bound the memory
            self._entries.clear()
        blocks = ceil_div(seq_len, block_size)
        self._entries[int(block_ids[0])] = (blocks, int(block_ids[blocks - 1]), seq_len)
