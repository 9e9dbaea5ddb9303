"""Prefill: estimate a layout per head, then run attention over it on the chosen backend.

Inputs are checked once, here at the public boundary; the private paths below trust them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import BACKEND_NAMES, select_backend
from .backends.checks import check_attention_inputs, check_layout_matches, check_out, check_softcap, resolve_scale
from .backends.host_copy import host_tensor
from .dense_guard import sparse_is_slower
from .errors import InvalidArgumentError, InvalidTypeError
from .layout import SparseLayout, concat_heads
from .patterns import Auto, Dense, Pattern
from .patterns.base import patterns_per_head

#: Pattern used when ``pattern=None``: per head the cheapest of vertical-slash / block-sparse / dense keeping 0.95
#: of the attention mass (`sparse_attn.patterns.auto`).
DEFAULT_PATTERN = Auto(gamma=0.95)
#: Key lengths below this run dense attention in `sparse_prefill` on the CPU (sparse would not pay for its estimate).
DENSE_BELOW = 4096
#: The same on CUDA tensors, where dense SDPA is fast and the estimate has a fixed cost (small kernels, a few host
#: syncs).  H200, bf16, B=1, D=128, synthetic workload, `sparse_prefill` with dense_below=0 vs dense SDPA as torch
#: picks it (measured at 16K; beyond, taken as the flash backend's time / 1.9 (32 heads) or / 2.0 (8 heads), the
#: ratios measured at 16K), at 16K / 32K / 64K: 32 query / 8 KV heads: VerticalSlash(1000, 6096) 0.37x / ~0.92x /
#: ~1.86x, the default pattern 0.19x / ~0.74x / ~0.85x (~0.89x at 128K: its estimate is too slow on a GPU); 8 / 2
#: heads: VerticalSlash 0.18x / ~0.44x / ~1.5x, the default 0.14x / ~0.38x / ~1.1x
#: (bench/results/gpu-check-h200-2026-12-04-s7*.txt).
DENSE_BELOW_CUDA = 65536


def dense_below_for(device) -> int:
    """The default ``dense_below`` for tensors on ``device``: `DENSE_BELOW_CUDA` on CUDA, else `DENSE_BELOW`."""
    return DENSE_BELOW_CUDA if torch.device(device).type == "cuda" else DENSE_BELOW
#: What ``backend=`` accepts (kept for callers of the old name).
BACKENDS = BACKEND_NAMES


def estimate(q, k, pattern=None, *, causal: bool = True, scale=None, block_m: int = 64,
             block_n: int = 64, scores_backend: str = "auto") -> SparseLayout:
    """Estimate the `SparseLayout` of ``pattern`` for every batch row and query head, from a sample of the queries.

    Arguments:
        q: ``[batch, query heads Hq, Lq, head_dim]`` (BHLD), fp16 / bf16 / fp32 / fp64.
        k: ``[batch, kv heads Hkv, Lk, head_dim]``, same dtype and device; ``Hq % Hkv == 0`` (GQA: query head h
            reads KV head ``h // (Hq // Hkv)``); ``Lq <= Lk``.
        pattern: one `Pattern` for every head, a list of one per query head, or None (`DEFAULT_PATTERN`).  Heads
            of one pattern family are estimated together; budgets may differ per head.
        causal: queries are the **last** Lq key positions (bottom-right alignment, as in chunked prefill)::

                keys    0 ......... Lk-Lq ...... Lk-1
                query 0             x
                query Lq-1                        x     (x: the query's own position, the last key it sees)

        scale: softmax scale of the scores (default ``head_dim ** -0.5``).
        block_m, block_n: query rows per layout row block, keys per tile (64, 64).
        scores_backend: what scores the vertical-slash sample (`sparse_attn.estimators.score_backends`): "auto"
            (Triton on CUDA tensors, the fused C++ pass on CPU tensors, else torch), "triton", "cpu" or "torch".

    Returns:
        A `SparseLayout` ``[batch, Hq, ceil(Lq / block_m)]`` on q's device.  On a GPU the `VerticalSlash` and
        `BlockSparse` estimates make no host synchronisation; the default `Auto` makes a few per call (which heads
        need which estimate; 8-9 measured on an H200), not one per head.

    Raises:
        ValueError / TypeError (`sparse_attn.errors`) naming the argument when an input is malformed."""
    check_attention_inputs(q, k, k)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    return _estimate(q, k, _patterns_per_head(pattern, q.shape[1]), causal=causal,
                     scale=resolve_scale(scale, q.shape[-1]), block_m=block_m, block_n=block_n,
                     scores_backend=scores_backend)


def sparse_attention(q, k, v, layout: SparseLayout, *, causal: bool = True, scale=None, backend: str = "auto",
                     return_lse: bool = False, softcap: float = 0.0, check_layout: bool = True, out=None):
    """Attention of each query block over only the keys its ``layout`` lists.

    Arguments:
        q: ``[batch, Hq, Lq, head_dim]``; k, v: ``[batch, Hkv, Lk, head_dim]`` (any strides; ``Hq % Hkv == 0``,
            KV never repeated; ``Lq <= Lk``).
        layout: a `SparseLayout` built for these shapes (``[batch, Hq]``, q_len Lq, k_len Lk, q's device).
        causal: with True, each query also sees only keys at or before its position, the queries being the
            **last** Lq keys (bottom-right alignment; see `estimate`); with False the layout alone decides.
        scale: softmax scale (default ``head_dim ** -0.5``).
        backend: "auto" (Triton on CUDA tensors, the compiled C++ kernel on CPU tensors, torch otherwise), or one
            of "cpu", "torch", "triton", "cuda", "flex" (`sparse_attn.backends`).
        return_lse: also return the natural-log LSE of each row's scaled scores.
        softcap: when > 0, scores become ``softcap * tanh(score / softcap)`` before the softmax (Gemma-2).
        check_layout: validate the layout's indices (one host sync); layouts from `estimate` are valid.
        out: optional ``[batch, Hq, Lq, head_dim]`` tensor of q's dtype and device, last dimension contiguous (any
            other strides), that receives the output: an engine's output rows, written in place by backends that
            can (``writes_out``; the cpu backend), copied into by the others.

    Returns:
        ``out [batch, Hq, Lq, head_dim]`` in q's dtype (``out`` itself when given), and with ``return_lse`` the
        LSE ``[batch, Hq, Lq]`` in fp32 (-inf, with output 0, for a row that sees no key).

    Raises:
        ValueError / TypeError naming the argument for malformed inputs; `NotSupportedError` (a ValueError)
        listing every reason when the chosen backend (or, for "auto", every backend) cannot run the inputs."""
    check_attention_inputs(q, k, v)
    if not isinstance(layout, SparseLayout):
        raise InvalidTypeError(f"layout must be a SparseLayout, got {type(layout).__name__}")
    check_layout_matches(layout, q, k)
    if check_layout:
        layout.check_indices()
    softcap = check_softcap(softcap)
    if out is not None:
        check_out(out, q, k, v)
    chosen = select_backend(backend, q, k, v, layout, return_lse=return_lse, softcap=softcap)
    return chosen.run(q, k, v, layout, causal=causal, scale=resolve_scale(scale, q.shape[-1]),
                      return_lse=return_lse, softcap=softcap, out=out)


def sparse_prefill(q, k, v, pattern=None, *, causal: bool = True, scale=None, backend: str = "auto",
                   softcap: float = 0.0, dense_below: int | None = None):
    """Estimate per-head layouts (`estimate`) and run sparse attention over them (`sparse_attention`): the one
    call for a prefill.

    Arguments:
        q: ``[batch, query heads Hq, Lq, head_dim]`` (BHLD), fp16 / bf16 / fp32 / fp64.
        k, v: ``[batch, kv heads Hkv, Lk, head_dim]``, same dtype and device; ``Hq % Hkv == 0`` (GQA without
            repeating KV); ``Lq <= Lk``.
        pattern: one `Pattern` for every head, a list of one per query head, or None (`DEFAULT_PATTERN`).
        causal: bottom-right alignment: the queries are the **last** Lq key positions (drawn in `estimate`).
        scale: softmax scale (default ``head_dim ** -0.5``).
        backend: ``"auto"`` or a name in `sparse_attn.backends.BACKEND_NAMES` (see `sparse_attention`).
        softcap: ``softcap * tanh(score / softcap)`` before the softmax when > 0 (Gemma-2); 0 = off.
        dense_below: key lengths below it (default `dense_below_for` q's device: 4096 on the CPU, 65536 on CUDA)
            run dense attention.  So do all-`Dense` patterns (sparse would not pay for its estimate there) and an
            estimated layout the chosen backend would run slower than dense SDPA (`dense_guard`).  Dense attention
            runs on the chosen backend where that is faster than SDPA (the compiled CPU kernel: see
            `DENSE_ON_BACKEND_MIN_QUERIES`), else SDPA.

    Returns:
        ``out [batch, Hq, Lq, head_dim]`` in q's dtype.

    Raises:
        ValueError / TypeError (`sparse_attn.errors`) naming a malformed argument; `NotSupportedError` listing
        every backend's reasons when none can run the inputs (checked first, even where the input runs dense)."""
    check_attention_inputs(q, k, v)
    patterns = _patterns_per_head(pattern, q.shape[1])
    softcap = check_softcap(softcap)
    threshold = dense_below_for(q.device) if dense_below is None else dense_below
    chosen = select_backend(backend, q, k, v, softcap=softcap)      # fail early, even where the input runs dense
    scale = resolve_scale(scale, q.shape[-1])
    if k.shape[2] < threshold or all(isinstance(p, Dense) for p in patterns):
        return _dense_route(q, k, v, chosen, causal=causal, scale=scale, softcap=softcap)
    layout = _estimate(q, k, patterns, causal=causal, scale=scale, block_m=64, block_n=64)
    if not softcap and sparse_is_slower(layout, chosen, causal=causal):   # never slower than dense
        return _dense_route(q, k, v, chosen, causal=causal, scale=scale, softcap=softcap)
    return chosen.run(q, k, v, layout, causal=causal, scale=scale, softcap=softcap)


#: `sparse_prefill`'s dense cases run on the chosen backend, over an all-keys layout, where it computes a key
#: cheaper than SDPA (`Backend.cost_per_key` < 1: the compiled CPU kernel, 2.0-2.6x SDPA's speed on a dense causal
#: layout in fp32 and 3.3-3.8x in bf16 from 1K to 16K keys; bench/results/cpu-dense-route-2core-2026-12-04-s8.txt)
#: and there are at least this many queries (with one query row SDPA was 2.3-2.8x faster).
DENSE_ON_BACKEND_MIN_QUERIES = 128


def _dense_route(q, k, v, chosen, *, causal: bool, scale: float, softcap: float):
    """Exact dense attention on the faster of ``chosen`` (a `Backend`) and SDPA; on ``chosen`` with ``softcap``
    (SDPA has none)."""
    if softcap or (chosen.cost_per_key < 1 and q.shape[2] >= DENSE_ON_BACKEND_MIN_QUERIES):
        layout = _estimate(q, k, [Dense()] * q.shape[1], causal=causal, scale=scale, block_m=64, block_n=64)
        return chosen.run(q, k, v, layout, causal=causal, scale=scale, softcap=softcap)
    return _dense(q, k, v, causal=causal, scale=scale)


def dense_attention(q, k, v, *, causal: bool = True, scale=None):
    """Dense attention through PyTorch SDPA, the baseline every sparse path is measured against.

    Arguments:
        q: ``[batch, Hq, Lq, head_dim]``; k, v: ``[batch, Hkv, Lk, head_dim]``, same dtype and device,
            ``Hq % Hkv == 0`` (GQA without repeating KV), ``Lq <= Lk``.
        causal: bottom-right alignment (the queries are the last Lq keys); scale: default ``head_dim ** -0.5``.

    Returns:
        ``[batch, Hq, Lq, head_dim]`` in q's dtype.

    Raises:
        ValueError / TypeError (`sparse_attn.errors`) naming a malformed argument."""
    check_attention_inputs(q, k, v)
    return _dense(q, k, v, causal=causal, scale=resolve_scale(scale, q.shape[-1]))


def _dense(q, k, v, *, causal: bool, scale: float):
    Lq, Lk = q.shape[2], k.shape[2]
    mask = None
    if causal and Lq != Lk:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(Lq, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and Lq == Lk, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _estimate(q, k, patterns: list[Pattern], *, causal: bool, scale: float, block_m: int,
              block_n: int, scores_backend: str = "auto") -> SparseLayout:
    """`estimate` on checked inputs: heads grouped by pattern family, one `build` call per group."""
    groups: dict = {}
    for head, p in enumerate(patterns):
        groups.setdefault(p.group_key(), []).append(head)
    layouts, order = [], []
    for heads in groups.values():
        family = type(patterns[heads[0]])
        index = host_tensor(heads, dtype=torch.long, device=q.device)          # no stream sync on a GPU
        options = {"scores_backend": scores_backend} if family.takes_scores_backend else {}
        layouts.append(family.build([patterns[h] for h in heads], index, q, k, causal=causal, scale=scale,
                                    block_m=block_m, block_n=block_n, **options))
        order.extend(heads)
    layout = layouts[0] if len(layouts) == 1 else concat_heads(layouts)
    if order != sorted(order):
        inverse = sorted(range(len(order)), key=order.__getitem__)
        layout = layout.select_heads(host_tensor(inverse, dtype=torch.long, device=q.device))
    return layout


def _patterns_per_head(pattern, n_heads: int) -> list[Pattern]:
    return patterns_per_head(DEFAULT_PATTERN if pattern is None else pattern, n_heads)


def _check_block(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    return value

