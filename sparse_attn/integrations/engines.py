"""Inference-engine entry points: the call signatures and results of vLLM's flash-attention fork / SGLang's
sgl-kernel, so an engine can swap its import for ours and get the same numbers.

* `sparse_attn_func` -- BLHD tensors (``q [B, Lq, Hq, D]``, ``k, v [B, Lk, Hkv, D]``) plus a
  ``block_count, block_offset, column_count, column_index`` index, as vLLM/SGLang's vertical-slash kernel.
* `sparse_attn_varlen_func` -- the same on packed (``cu_seqlens``) tensors, one index entry per sequence, in
  upstream's argument order (the index before ``cu_seqlens_q``).
* `convert_vertical_slash_indexes`, `convert_vertical_slash_indexes_mergehead` -- vertical (key position) / slash
  (diagonal distance) indexes to the block index above, the same tensors as the engines' CUDA kernel
  (`vertical_slash_engine`); ``clip=True`` gives this package's tighter index instead (`vertical_slash_clipped`).
* `sparse_prefill_varlen` -- estimate + attend each packed sequence separately with a `Pattern` (ours).

The attention functions take a keyword ``backend`` (default "auto": the Triton kernel on CUDA tensors, the
compiled CPU kernel on CPU tensors where it builds, torch otherwise), passed on to `sparse_attention`.  Tensors
are converted between BLHD and the package's canonical BHLD with transposes at the boundary (views, no copies, no
repeated KV heads).
"""
from __future__ import annotations

import torch

from ..layout import SparseLayout
from ..backends.checks import check_softcap
from ..backends.cuda import CUDA
from ..backends.cuda.vertical_slash_args import check_vertical_slash_args
from ..prefill import sparse_attention, sparse_prefill
from .vertical_slash_clipped import clipped_vertical_slash_indexes
from .vertical_slash_engine import engine_convert, engine_convert_unsorted
from ..layout import ceil_div
from ..errors import InvalidArgumentError

#: Block sizes of the engines' ``sparse_attn_func`` (fixed there too).
BLOCK_M = 64
BLOCK_N = 64

__all__ = ["BLOCK_M", "BLOCK_N", "convert_vertical_slash_indexes", "convert_vertical_slash_indexes_mergehead",
           "sparse_attn_func", "sparse_attn_varlen_func", "sparse_prefill_varlen"]

_INDEX_NAMES = ("block_count", "block_offset", "column_count", "column_index")




# ---------------------------------------------------------------------------------------------------- checks
def _check_unsupported(dropout_p, softcap, alibi_slopes) -> None:
    """What the engines accept and this inference path cannot do.  ``return_attn_probs`` needs no check: the
    engines only honour it with dropout (``return_attn_probs and dropout_p > 0``), which is refused here."""
    if dropout_p != 0.0:
        raise InvalidArgumentError(f"dropout_p must be 0.0 (dropout is not supported: this is an inference path), got "
                         f"{dropout_p!r}")
    check_softcap(softcap)
    if alibi_slopes is not None:
        raise InvalidArgumentError("alibi_slopes must be None (ALiBi is not supported)")


def _engine_lse(lse):
    """flash-attention reports a row that sees no key with LSE +inf (ours: -inf)."""
    return lse.masked_fill_(lse == float("-inf"), float("inf"))


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise InvalidArgumentError(f"{name} must be {ndim}-d {layout}, got shape {tuple(t.shape)}")


def _check_index(name: str, t, ndim: int, lead: tuple, min_rows: int) -> None:
    """An int32 index tensor with leading shape ``lead`` ([B, H]) and at least ``min_rows`` query blocks."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise InvalidArgumentError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != ndim:
        raise InvalidArgumentError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if tuple(t.shape[:2]) != lead:
        raise InvalidArgumentError(f"{name} must have leading shape {lead} (batch, query heads), got {tuple(t.shape)}")
    if t.shape[2] < min_rows:
        raise InvalidArgumentError(f"{name} has {t.shape[2]} query blocks; at least ceil(seqlen_q / {BLOCK_M}) = {min_rows} "
                         f"are needed")


def _layout(indexes, lead: tuple, q_len: int, k_len: int) -> SparseLayout:
    """A SparseLayout over the first ``ceil(q_len / BLOCK_M)`` query blocks of the engine's index tensors (engines
    size them for the padded context, so extra trailing rows are allowed and ignored)."""
    n_qb = ceil_div(q_len, BLOCK_M)
    for name, t, ndim in zip(_INDEX_NAMES, indexes, (3, 4, 3, 4)):
        _check_index(name, t, ndim, lead, n_qb)
    rows = [t[:, :, :n_qb] for t in indexes]
    return SparseLayout(*rows, q_len=q_len, k_len=k_len, block_m=BLOCK_M, block_n=BLOCK_N)


def _check_out(out, shape: tuple, dtype, device) -> None:
    if not isinstance(out, torch.Tensor):
        raise InvalidArgumentError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise InvalidArgumentError(f"out must be a {dtype} tensor of shape {shape} on {device}, got {out.dtype} "
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
    natural-log LSE ``[B, Hq, Lq]`` (fp32; +inf for a row that sees no key, whose output is 0, as in
    flash-attention).  ``softcap > 0`` caps the scaled scores at ``softcap * tanh(s / softcap)`` (Gemma-2).
    ``dropout_p`` and ``alibi_slopes`` must keep their defaults (ValueError otherwise); ``deterministic`` and
    ``return_attn_probs`` are accepted and ignored, as upstream does without dropout.  ``backend`` is passed to
    `sparse_attention` ("auto", "torch", "triton", ...)."""
    _check_unsupported(dropout_p, softcap, alibi_slopes)
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
                                  scale=softmax_scale, return_lse=True, backend=backend, softcap=float(softcap))
        o, lse = o.transpose(1, 2), _engine_lse(lse)
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse) if return_softmax_lse else o


# ---------------------------------------------------------------------------------------------------- varlen
def _check_cu_seqlens(name: str, cu, total: int, max_name: str, max_len) -> list[int]:
    if not isinstance(cu, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise InvalidArgumentError(f"{name} must be a non-empty 1-d int32 tensor [num_seqs + 1], got {cu.dtype} "
                         f"{tuple(cu.shape)}")
    bounds = cu.tolist()
    if bounds[0] != 0:
        raise InvalidArgumentError(f"{name} must start at 0, got {bounds[0]}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise InvalidArgumentError(f"{name} must be non-decreasing, got {bounds}")
    if bounds[-1] != total:
        raise InvalidArgumentError(f"{name} must end at the packed length {total}, got {bounds[-1]}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
        raise InvalidArgumentError(f"{max_name} must be a non-negative int, got {max_len!r}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        raise InvalidArgumentError(f"{max_name} ({max_len}) is below the length of sequences {too_long} "
                         f"(lengths {[lengths[i] for i in too_long]}) given by {name}")
    return bounds


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Validate packed inputs; return the per-sequence (q start, q end, k start, k end) bounds."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 3, "[total_tokens, heads, head_dim] (packed varlen)")
    if k.shape != v.shape:
        raise InvalidArgumentError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q)
    bk = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)
    if len(bq) != len(bk):
        raise InvalidArgumentError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(bq) - 1} and {len(bk) - 1}")
    seqs = [(bq[i], bq[i + 1], bk[i], bk[i + 1]) for i in range(len(bq) - 1)]
    bad = [i for i, (q0, q1, k0, k1) in enumerate(seqs) if q1 - q0 > k1 - k0]
    if bad:
        raise InvalidArgumentError(f"cu_seqlens_q / cu_seqlens_k: sequences {bad} have more queries than keys (queries are "
                         f"the last positions of each sequence, so seqlen_q <= seqlen_k)")
    return seqs


def _bhld(t, start: int, end: int):
    """Rows [start, end) of a packed [total, H, D] tensor as a BHLD [1, H, L, D] view."""
    return t[start:end].unsqueeze(0).transpose(1, 2)


def sparse_attn_varlen_func(q, k, v, block_count, block_offset, column_count, column_index, cu_seqlens_q,
                            cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                            causal=False, softcap=0.0, alibi_slopes=None, deterministic=False,
                            return_attn_probs=False, *, return_softmax_lse=False, out=None, backend="auto"):
    """`sparse_attn_func` on packed tensors: ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]``, sequence ``i``
    being rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` (int32 ``[num_seqs + 1]``) of q and likewise of k/v.
    Sequences never attend across their boundaries; each one's queries are its last positions.

    The index tensors have one entry per sequence: ``block_count [num_seqs, Hq, nQb]`` etc., ``nQb`` at least
    ``ceil(max seqlen_q / 64)`` (sequence ``i`` uses its first ``ceil(seqlen_q_i / 64)`` rows).  Returns
    ``out [total_q, Hq, D]`` and, with ``return_softmax_lse``, the LSE ``[Hq, total_q]`` (fp32, +inf for a row
    with no key), flash-attention's varlen LSE layout.  Arguments in upstream's order; the rest as
    `sparse_attn_func`."""
    _check_unsupported(dropout_p, softcap, alibi_slopes)
    seqs = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    Hq = q.shape[1]
    lead = (len(seqs), Hq)
    longest = max([q1 - q0 for q0, q1, _, _ in seqs] + [0])
    indexes = (block_count, block_offset, column_count, column_index)
    for name, t, ndim in zip(_INDEX_NAMES, indexes, (3, 4, 3, 4)):
        _check_index(name, t, ndim, lead, ceil_div(longest, BLOCK_M))
    if out is not None:
        _check_out(out, tuple(q.shape), q.dtype, q.device)
    result = out if out is not None else torch.empty_like(q)
    lse = torch.full((Hq, q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    for i, (q0, q1, k0, k1) in enumerate(seqs):
        if q1 == q0:
            continue
        layout = _layout(tuple(t[i:i + 1] for t in indexes), (1, Hq), q1 - q0, k1 - k0)
        o, l = sparse_attention(_bhld(q, q0, q1), _bhld(k, k0, k1), _bhld(v, k0, k1), layout, causal=causal,
                                scale=softmax_scale, return_lse=True, backend=backend, softcap=float(softcap))
        result[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = _engine_lse(l[0])
    return (result, lse) if return_softmax_lse else result


def sparse_prefill_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, pattern=None, *,
                          causal=True, softmax_scale=None, softcap=0.0, dense_below=None, backend="auto"):
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
                           scale=softmax_scale, softcap=softcap, dense_below=dense_below, backend=backend)
        result[q0:q1] = o[0].transpose(0, 1)
    return result


# ---------------------------------------------------------------------------------------------------- indexes
def _is_sorted(t, counts, descending: bool) -> bool:
    """Whether each head's first ``counts[h]`` entries of ``t [B, H, n]`` are in the engines' order."""
    if t.shape[-1] < 2:
        return True
    step = t[..., 1:].long() - t[..., :-1].long()
    used = torch.arange(1, t.shape[-1], device=t.device) < counts[:, None]           # pairs inside the count
    return not bool(((step > 0 if descending else step < 0) & used).any())


def _check_counts(name: str, t, heads: int, width: int, of: str):
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != (heads,):
        raise InvalidArgumentError(f"{name} must be an int32 tensor of shape ({heads},) (one count per head), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if bool(((t < 0) | (t > width)).any()):
        raise InvalidArgumentError(f"{name} entries must lie in [0, {width}] (the last dimension of {of}), got {t.tolist()}")
    return t.to(torch.int64)


def _past_count(t, counts, fill: int):
    """``t [B, H, n]`` as int64 with each head's entries past ``counts[h]`` set to ``fill`` (a value the clipped
    conversion ignores: a negative vertical, a slash too far to reach any key)."""
    j = torch.arange(t.shape[-1], device=t.device)
    return torch.where(j < counts[:, None], t.long(), fill)


def _convert(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, v_counts, s_counts, context_size,
             block_size_M, block_size_N, causal, clip):
    q_lens, kv_lens = check_vertical_slash_args(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size,
                                                block_size_M, block_size_N, kv_within_context=False)
    heads, dev = vertical_indexes.shape[1], vertical_indexes.device
    if v_counts is None:
        v_counts = torch.full((heads,), vertical_indexes.shape[2], dtype=torch.int64, device=dev)
        s_counts = torch.full((heads,), slash_indexes.shape[2], dtype=torch.int64, device=dev)
    if not clip:
        convert = engine_convert if (_is_sorted(vertical_indexes, v_counts, descending=False)
                                     and _is_sorted(slash_indexes, s_counts, descending=True)) \
            else engine_convert_unsorted
        return convert(q_lens, kv_lens, vertical_indexes, slash_indexes, v_counts, s_counts, context_size,
                       block_size_M, block_size_N, causal)
    # ours: the entries past a head's count become values the conversion ignores
    vertical, slash = _past_count(vertical_indexes, v_counts, -1), _past_count(slash_indexes, s_counts, 1 << 40)
    if not causal:           # the engines place non-causal queries after the last key: shift to bottom-right
        slash = slash.long() - torch.tensor(q_lens, device=dev)[:, None, None]
    if not CUDA.vertical_slash_index_reasons(vertical, kv_lens, context_size):     # else the torch conversion
        return CUDA.vertical_slash_index(q_lens, kv_lens, vertical, slash, context_size, block_size_M, block_size_N,
                                         causal)
    return clipped_vertical_slash_indexes(q_lens, kv_lens, vertical, slash, context_size, block_size_M,
                                          block_size_N, causal)


def convert_vertical_slash_indexes(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size,
                                   block_size_M, block_size_N, causal=True, *, clip=False):
    """Vertical / slash indexes to the block index of `sparse_attn_func`: vLLM's / SGLang's function of that name,
    returning the same tensors as their CUDA kernel.

    * ``q_seqlens``, ``kv_seqlens``: int32 ``[batch]`` (or ``[1]`` for every entry); entry ``b`` has
      ``kv_seqlens[b]`` keys and ``q_seqlens[b] <= kv_seqlens[b]`` queries.  With ``causal`` the queries are the
      last ``q_seqlen`` positions; without it they sit *after* the last key (query ``i`` at ``kv_seqlen + i``, the
      engines' convention for dual-chunk "succ" / "inter" stages).
    * ``vertical_indexes [batch, heads, NNZ_V]``: key positions, ascending; ``slash_indexes [batch, heads,
      NNZ_S]``: distances ``query position - key``, descending (the engines' order; other orders give what the
      engines give for them too, through a slow per-block walk).
    * ``context_size`` only sizes the output rows: ``nR = ceil(context_size / block_size_M)``.

    Returns int32 ``block_count [batch, heads, nR]``, ``block_offset [batch, heads, nR, NNZ_S]``, ``column_count
    [batch, heads, nR]``, ``column_index [batch, heads, nR, NNZ_V]`` (rows past an entry's queries and padding are
    0).  Which keys: see `sparse_attn.integrations.vertical_slash_engine` (the engines' rules, quirks included:
    slash chunks near key 0 are clamped to ``[0, block_size_M)``, with ``causal`` verticals past the last slash
    range are dropped, merged ranges grow by whole ``block_size_M`` chunks).

    ``clip=True`` returns this package's index instead: every key the pattern names, slash ranges clipped to the
    block's rows, tiles of a merged range never overlapping (``NB`` tile slots, see `vertical_slash_clipped`)."""
    return _convert(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, None, None, context_size,
                    block_size_M, block_size_N, causal, clip)


def convert_vertical_slash_indexes_mergehead(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes,
                                             vertical_indices_count, slash_indices_count, context_size,
                                             block_size_M, block_size_N, causal=True, *, clip=False):
    """`convert_vertical_slash_indexes` with a budget per head: head ``h`` uses only the first
    ``vertical_indices_count[h]`` verticals and ``slash_indices_count[h]`` slashes (int32 ``[heads]``); the rest of
    each row of ``vertical_indexes`` / ``slash_indexes`` is padding (the engines fill it with int32 max / min).
    Output widths stay ``NNZ_S`` / ``NNZ_V`` (the buffers' sizes).  Entries the engines leave unwritten
    (``torch.empty``) are 0 here."""
    heads = vertical_indexes.shape[1] if isinstance(vertical_indexes, torch.Tensor) and vertical_indexes.dim() == 3 \
        else None
    if heads is not None and isinstance(slash_indexes, torch.Tensor) and slash_indexes.dim() == 3:
        v_counts = _check_counts("vertical_indices_count", vertical_indices_count, heads, vertical_indexes.shape[2],
                                 "vertical_indexes")
        s_counts = _check_counts("slash_indices_count", slash_indices_count, heads, slash_indexes.shape[2],
                                 "slash_indexes")
    else:                     # let the common checks name the malformed index
        v_counts = s_counts = None
    return _convert(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, v_counts, s_counts, context_size,
                    block_size_M, block_size_N, causal, clip)
