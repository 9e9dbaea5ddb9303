"""Inference-engine entry points: the call signatures of vLLM's flash-attention fork / SGLang's sgl-kernel.

* `sparse_attn_func` -- BLHD tensors (``q [B, Lq, Hq, D]``, ``k, v [B, Lk, Hkv, D]``) plus a
  ``block_count, block_offset, column_count, column_index`` index, as vLLM/SGLang's vertical-slash kernel.
* `sparse_attn_varlen_func` -- the same on packed (``cu_seqlens``) tensors, one index entry per sequence.
* `sparse_prefill_varlen` -- estimate + attend each packed sequence separately with a `Pattern`.
* `convert_vertical_slash_indexes` -- vertical (key position) / slash (diagonal distance) indexes to the block
  index above, computed with tensor ops (with the CUDA kernel of ``csrc/`` on CUDA tensors when CuPy works).

The three attention functions take a keyword ``backend`` (default "auto": the Triton kernel on CUDA tensors, the
compiled CPU kernel on CPU tensors where it builds, torch otherwise), passed on to `sparse_attention`.  Tensors
are converted between BLHD and the package's canonical BHLD with transposes at the boundary (views, no copies, no
repeated KV heads).
"""
from __future__ import annotations

import torch

from ..layout import SparseLayout, keys_in_tiles
from ..estimators.tiles import block_row_positions, compact, ranges_to_tiles
from ..backends.cuda.vertical_slash_args import check_vertical_slash_args, vertical_slash_output_sizes
from ..prefill import sparse_attention, sparse_prefill

#: Block sizes of the engines' ``sparse_attn_func`` (fixed there too).
BLOCK_M = 64
BLOCK_N = 64

__all__ = ["BLOCK_M", "BLOCK_N", "convert_vertical_slash_indexes", "sparse_attn_func", "sparse_attn_varlen_func",
           "sparse_prefill_varlen"]

_INDEX_NAMES = ("block_count", "block_offset", "column_count", "column_index")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------- checks
def _check_unsupported(dropout_p, softcap, alibi_slopes, return_attn_probs) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (dropout is not supported: this is an inference path), got "
                         f"{dropout_p!r}")
    if softcap != 0.0:
        raise ValueError(f"softcap must be 0.0 (logit soft-capping is not supported), got {softcap!r}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None (ALiBi is not supported)")
    if return_attn_probs:
        raise ValueError("return_attn_probs must be False (attention probabilities are never materialised)")


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d {layout}, got shape {tuple(t.shape)}")


def _check_index(name: str, t, ndim: int, lead: tuple, min_rows: int) -> None:
    """An int32 index tensor with leading shape ``lead`` ([B, H]) and at least ``min_rows`` query blocks."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if tuple(t.shape[:2]) != lead:
        raise ValueError(f"{name} must have leading shape {lead} (batch, query heads), got {tuple(t.shape)}")
    if t.shape[2] < min_rows:
        raise ValueError(f"{name} has {t.shape[2]} query blocks; at least ceil(seqlen_q / {BLOCK_M}) = {min_rows} "
                         f"are needed")


def _layout(indexes, lead: tuple, q_len: int, k_len: int) -> SparseLayout:
    """A SparseLayout over the first ``ceil(q_len / BLOCK_M)`` query blocks of the engine's index tensors (engines
    size them for the padded context, so extra trailing rows are allowed and ignored)."""
    n_qb = _ceil_div(q_len, BLOCK_M)
    for name, t, ndim in zip(_INDEX_NAMES, indexes, (3, 4, 3, 4)):
        _check_index(name, t, ndim, lead, n_qb)
    rows = [t[:, :, :n_qb] for t in indexes]
    return SparseLayout(*rows, q_len=q_len, k_len=k_len, block_m=BLOCK_M, block_n=BLOCK_N)


def _check_out(out, shape: tuple, dtype, device) -> None:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be a {dtype} tensor of shape {shape} on {device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")


# ---------------------------------------------------------------------------------------------------- BLHD
def sparse_attn_func(q, k, v, block_count, block_offset, column_count, column_index, dropout_p=0.0,
                     softmax_scale=None, causal=False, softcap=0.0, alibi_slopes=None, deterministic=False,
                     return_attn_probs=False, *, return_softmax_lse=False, out=None, backend="auto"):
    """Vertical-slash sparse attention with vLLM / SGLang's ``sparse_attn_func`` signature, on BLHD tensors.

    ``q [B, Lq, Hq, D]``, ``k, v [B, Lk, Hkv, D]`` (``Hq % Hkv == 0``; ``Lq <= Lk``, the queries being the last
    ``Lq`` positions).  The index (int32) is ``block_count [B, Hq, nQb]``, ``block_offset [B, Hq, nQb, NB]``,
    ``column_count [B, Hq, nQb]``, ``column_index [B, Hq, nQb, NC]`` with 64-row query blocks and 64-key tiles
    (`SparseLayout`); ``nQb`` may exceed ``ceil(Lq / 64)`` (rows past it are ignored).  With ``causal=False`` the
    index alone decides which keys a query sees; with ``causal=True`` the bottom-right causal mask applies too.

    Returns ``out [B, Lq, Hq, D]`` (written into ``out`` when given) and, with ``return_softmax_lse``, also the
    natural-log LSE ``[B, Hq, Lq]`` (fp32; -inf for a row that sees no key, whose output is 0).
    ``dropout_p``, ``softcap``, ``alibi_slopes`` and ``return_attn_probs`` must keep their defaults (ValueError
    otherwise); ``deterministic`` is accepted and ignored (this path is deterministic).  ``backend`` is passed to
    `sparse_attention` ("auto", "torch", "triton", ...)."""
    _check_unsupported(dropout_p, softcap, alibi_slopes, return_attn_probs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4, "[batch, seqlen, heads, head_dim] (BLHD)")
    B, Lq, Hq, D = q.shape
    Lk = k.shape[1]
    layout = _layout((block_count, block_offset, column_count, column_index), (B, Hq), Lq, Lk)
    if out is not None:
        _check_out(out, (B, Lq, Hq, D), q.dtype, q.device)
    if Lq == 0:       # sparse_attention cannot take an empty query (torch backend reshape); nothing to compute
        o, lse = q.new_empty(B, 0, Hq, D), torch.empty(B, Hq, 0, dtype=torch.float32, device=q.device)
    else:
        o, lse = sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, causal=causal,
                                  scale=softmax_scale, return_lse=True, backend=backend)
        o = o.transpose(1, 2)
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse) if return_softmax_lse else o


# ---------------------------------------------------------------------------------------------------- varlen
def _check_cu_seqlens(name: str, cu, total: int, max_name: str, max_len) -> list[int]:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-d int32 tensor [num_seqs + 1], got {cu.dtype} "
                         f"{tuple(cu.shape)}")
    bounds = cu.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"{name} must be non-decreasing, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {bounds[-1]}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {max_len!r}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        raise ValueError(f"{max_name} ({max_len}) is below the length of sequences {too_long} "
                         f"(lengths {[lengths[i] for i in too_long]}) given by {name}")
    return bounds


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Validate packed inputs; return the per-sequence (q start, q end, k start, k end) bounds."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 3, "[total_tokens, heads, head_dim] (packed varlen)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q)
    bk = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)
    if len(bq) != len(bk):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(bq) - 1} and {len(bk) - 1}")
    seqs = [(bq[i], bq[i + 1], bk[i], bk[i + 1]) for i in range(len(bq) - 1)]
    bad = [i for i, (q0, q1, k0, k1) in enumerate(seqs) if q1 - q0 > k1 - k0]
    if bad:
        raise ValueError(f"cu_seqlens_q / cu_seqlens_k: sequences {bad} have more queries than keys (queries are "
                         f"the last positions of each sequence, so seqlen_q <= seqlen_k)")
    return seqs


def _bhld(t, start: int, end: int):
    """Rows [start, end) of a packed [total, H, D] tensor as a BHLD [1, H, L, D] view."""
    return t[start:end].unsqueeze(0).transpose(1, 2)


def sparse_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_count,
                            block_offset, column_count, column_index, dropout_p=0.0, softmax_scale=None,
                            causal=False, softcap=0.0, alibi_slopes=None, deterministic=False,
                            return_attn_probs=False, *, return_softmax_lse=False, out=None, backend="auto"):
    """`sparse_attn_func` on packed tensors: ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``, sequence ``i``
    being rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` (int32 ``[num_seqs + 1]``) of q and likewise of k/v.
    Sequences never attend across their boundaries; each one's queries are its last positions.

    The index tensors have one entry per sequence: ``block_count [num_seqs, Hq, nQb]`` etc., ``nQb`` at least
    ``ceil(max seqlen_q / 64)`` (sequence ``i`` uses its first ``ceil(seqlen_q_i / 64)`` rows).  Returns
    ``out [total_q, Hq, D]`` and, with ``return_softmax_lse``, the LSE ``[Hq, total_q]`` (fp32), flash-attention's
    varlen LSE layout."""
    _check_unsupported(dropout_p, softcap, alibi_slopes, return_attn_probs)
    seqs = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    Hq = q.shape[1]
    lead = (len(seqs), Hq)
    longest = max([q1 - q0 for q0, q1, _, _ in seqs] + [0])
    indexes = (block_count, block_offset, column_count, column_index)
    for name, t, ndim in zip(_INDEX_NAMES, indexes, (3, 4, 3, 4)):
        _check_index(name, t, ndim, lead, _ceil_div(longest, BLOCK_M))
    if out is not None:
        _check_out(out, tuple(q.shape), q.dtype, q.device)
    result = out if out is not None else torch.empty_like(q)
    lse = torch.full((Hq, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for i, (q0, q1, k0, k1) in enumerate(seqs):
        if q1 == q0:
            continue
        layout = _layout(tuple(t[i:i + 1] for t in indexes), (1, Hq), q1 - q0, k1 - k0)
        o, l = sparse_attention(_bhld(q, q0, q1), _bhld(k, k0, k1), _bhld(v, k0, k1), layout, causal=causal,
                                scale=softmax_scale, return_lse=True, backend=backend)
        result[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l[0]
    return (result, lse) if return_softmax_lse else result


def sparse_prefill_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, pattern=None, *,
                          causal=True, softmax_scale=None, dense_below=None, backend="auto"):
    """`sparse_attn.sparse_prefill` on packed tensors: each sequence is estimated and attended on its own (no
    attention across sequence boundaries).  ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``, ``cu_seqlens_*``
    int32 ``[num_seqs + 1]``; ``pattern`` as in `sparse_prefill` (None: the default pattern), ``dense_below`` as
    there (key lengths below it run dense).  Returns ``[total_q, Hq, D]``."""
    seqs = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    result = torch.empty_like(q)
    for q0, q1, k0, k1 in seqs:
        if q1 == q0:
            continue
        o = sparse_prefill(_bhld(q, q0, q1), _bhld(k, k0, k1), _bhld(v, k0, k1), pattern, causal=causal,
                           scale=softmax_scale, dense_below=dense_below, backend=backend)
        result[q0:q1] = o[0].transpose(0, 1)
    return result


# ---------------------------------------------------------------------------------------------------- indexes
def convert_vertical_slash_indexes(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size,
                                   block_size_M, block_size_N, causal=True):
    """Vertical / slash indexes to the block index of `sparse_attn_func` (vLLM / SGLang's function of that name).

    * ``q_seqlens``, ``kv_seqlens``: int32 ``[batch]``; the queries of entry ``b`` are the last ``q_seqlens[b]``
      of its ``kv_seqlens[b]`` positions.  ``context_size`` (>= every kv length) sizes the output rows.
    * ``vertical_indexes [batch, heads, NNZ_V]``: key positions every query of the head sees.
    * ``slash_indexes [batch, heads, NNZ_S]``: diagonals, as distances ``query position - key``: slash ``s`` gives
      query row at position ``p`` the key ``p - s``.

    Neither needs to be sorted (vLLM wants verticals ascending and slashes descending; both work).  Entries outside
    the sequence are ignored, duplicates are harmless.  Per query block (``block_size_M`` rows at positions
    ``p0..p1``) slash ``s`` adds the key range ``[p0 - s, p1 - s]`` (clipped to the sequence, and with ``causal``
    to ``<= p1``); the ranges are merged (also across gaps shorter than ``block_size_N``) and each merged range
    ``[a, e)`` is covered by tiles at ``a, a + block_size_N, ...`` (the last may reach up to ``block_size_N - 1``
    keys past ``e``).  Verticals inside the sequence (with ``causal``, at or before ``p1``) that no tile covers
    become columns.

    Returns int32 ``block_count [batch, heads, nR]``, ``block_offset [batch, heads, nR, NB]``, ``column_count
    [batch, heads, nR]``, ``column_index [batch, heads, nR, NNZ_V]`` with ``nR = ceil(context_size /
    block_size_M)`` (rows past an entry's query blocks are empty) and ``NB = max(1, min(ceil(context_size /
    block_size_N) + 1, NNZ_S * (ceil(block_size_M / block_size_N) + 1)))``, a bound on the tile count (vLLM uses
    ``NNZ_S``, which can be too few when ``block_size_M > block_size_N``).  Padding entries are 0."""
    q_lens, kv_lens = check_vertical_slash_args(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes,
                                                context_size, block_size_M, block_size_N)
    if vertical_indexes.is_cuda:
        from ..backends.cuda.launcher import cuda_unavailable_reasons, vertical_slash_kernel
        if not cuda_unavailable_reasons():                  # the CUDA kernel when CuPy works; torch otherwise
            return vertical_slash_kernel(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size,
                                         block_size_M, block_size_N, causal)
    batch, heads = vertical_indexes.shape[:2]
    dev = vertical_indexes.device
    bm, bn = block_size_M, block_size_N
    nnz_v, nnz_s = vertical_indexes.shape[2], slash_indexes.shape[2]
    n_rows, max_tiles = vertical_slash_output_sizes(context_size, bm, bn, nnz_s)
    block_count = torch.zeros(batch, heads, n_rows, dtype=torch.int32, device=dev)
    block_offset = torch.zeros(batch, heads, n_rows, max_tiles, dtype=torch.int32, device=dev)
    column_count = torch.zeros(batch, heads, n_rows, dtype=torch.int32, device=dev)
    column_index = torch.zeros(batch, heads, n_rows, nnz_v, dtype=torch.int32, device=dev)
    for b in range(batch):                                 # entries differ in length; heads are done together
        q_len, kv_len = q_lens[b], kv_lens[b]
        if q_len == 0:
            continue
        p0, p1 = block_row_positions(q_len, kv_len, bm, device=dev)          # [nQb] first / last row position
        n_qb = p0.shape[0]
        limit = (p1 + 1) if causal else torch.full_like(p1, kv_len)           # keys < limit, per block
        s = slash_indexes[b].long()[:, None, :]                               # [H, 1, S]
        starts = (p0[None, :, None] - s).clamp(min=0)
        ends = torch.minimum(p1[None, :, None] - s + 1, limit[None, :, None].clamp(max=kv_len))
        if nnz_s:
            count, offsets = ranges_to_tiles(starts, ends, bn, max_tiles)   # [H, nQb], [H, nQb, max_tiles]
        else:             # ranges_to_tiles fails on zero ranges
            count = torch.zeros(heads, n_qb, dtype=torch.int32, device=dev)
            offsets = torch.zeros(heads, n_qb, max_tiles, dtype=torch.int32, device=dev)
        tiles_valid = torch.arange(max_tiles, device=dev) < count[..., None]
        vert = vertical_indexes[b].long().sort(-1).values[:, None, :].expand(heads, n_qb, nnz_v)
        keep = (vert >= 0) & (vert < limit[None, :, None])
        if nnz_v > 1:
            first = torch.ones_like(keep)
            first[..., 1:] = vert[..., 1:] != vert[..., :-1]
            keep &= first
        keep &= ~keys_in_tiles(vert, offsets.long(), tiles_valid, bn)
        c_count, c_index = compact(vert, keep, nnz_v)
        block_count[b, :, :n_qb], block_offset[b, :, :n_qb] = count, offsets
        column_count[b, :, :n_qb], column_index[b, :, :n_qb] = c_count, c_index
    return block_count, block_offset, column_count, column_index
