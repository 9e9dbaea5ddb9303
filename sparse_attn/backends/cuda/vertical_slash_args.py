"""Argument checks and output sizes of the vertical/slash -> SparseLayout index conversion, shared by the torch
implementation (`integrations.engines.convert_vertical_slash_indexes`) and its CUDA kernel (`backends.cuda.launcher`)."""
from __future__ import annotations

import torch
from ...layout import ceil_div
from ...errors import InvalidArgumentError




def _check_int_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != ndim:
        raise InvalidArgumentError(f"{name} must be a {ndim}-d int32 (or int64) tensor, got {t.dtype} {tuple(t.shape)}")


def check_vertical_slash_args(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size, block_size_M,
                              block_size_N, *, kv_within_context: bool = True) -> tuple[list[int], list[int]]:
    """Raise ValueError naming the bad argument; return the per-entry q / kv lengths as lists (one host sync: the
    lengths decide the work).  A single length applies to every batch entry (MInference passes that).
    ``kv_within_context``: kv lengths must not exceed ``context_size`` (our CUDA index kernel sizes its tiles by it;
    the engines' convert only sizes its output rows by it)."""
    _check_int_tensor("q_seqlens", q_seqlens, 1)
    _check_int_tensor("kv_seqlens", kv_seqlens, 1)
    _check_int_tensor("vertical_indexes", vertical_indexes, 3)
    _check_int_tensor("slash_indexes", slash_indexes, 3)
    for name, value in (("context_size", context_size), ("block_size_M", block_size_M),
                        ("block_size_N", block_size_N)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    batch, heads = vertical_indexes.shape[:2]
    if tuple(slash_indexes.shape[:2]) != (batch, heads):
        raise InvalidArgumentError(f"slash_indexes must have leading shape {(batch, heads)} like vertical_indexes, got "
                         f"{tuple(slash_indexes.shape)}")
    lens = []
    for name, t in (("q_seqlens", q_seqlens), ("kv_seqlens", kv_seqlens)):
        if t.shape[0] not in (1, batch):
            raise InvalidArgumentError(f"{name} must have 1 or {batch} entries (the batch of vertical_indexes), got "
                             f"{t.shape[0]}")
        values = t.tolist()
        lens.append(values * batch if len(values) == 1 else values)
    q_lens, kv_lens = lens
    bound = context_size if kv_within_context else float("inf")
    bad = [b for b in range(batch) if not 0 <= q_lens[b] <= kv_lens[b] <= bound]
    if bad:
        limit = " <= context_size" if kv_within_context else ""
        raise InvalidArgumentError(f"q_seqlens / kv_seqlens: entries {bad} break 0 <= q_seqlen <= kv_seqlen{limit} (queries "
                         f"are the last positions of each entry)")
    return q_lens, kv_lens

def vertical_slash_output_sizes(context_size: int, block_size_M: int, block_size_N: int, nnz_s: int):
    """(query block rows ``nR``, tile slots ``NB``) of the outputs; ``NB`` bounds the tile count of any row."""
    n_rows = ceil_div(context_size, block_size_M)
    max_tiles = max(1, min(ceil_div(context_size, block_size_N) + 1,
                           nnz_s * (ceil_div(block_size_M, block_size_N) + 1)))
    return n_rows, max_tiles
