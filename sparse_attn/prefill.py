"""Prefill: estimate a layout per head, then run attention over it on the chosen backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense_guard import sparse_is_slower
from .layout import SparseLayout, concat_heads
from .ops.checks import check_attention_inputs, check_layout_matches, resolve_scale
from .ops import cpu_kernel
from .ops.host_values import host_tensor
from .ops.torch_sparse import torch_sparse_attention
from .patterns import Auto, Dense, Pattern
from .patterns.base import patterns_per_head

#: Pattern used when ``pattern=None``: per head the cheapest of vertical-slash / block-sparse / dense keeping 0.95
#: of the attention mass (`sparse_attn.patterns.auto`).
DEFAULT_PATTERN = Auto(gamma=0.95)
#: Key lengths below this run dense attention in `sparse_prefill` (sparse would not pay for its estimate).
DENSE_BELOW = 4096
BACKENDS = ("auto", "cpu", "torch", "flex", "triton", "cuda")


def _patterns_per_head(pattern, n_heads: int) -> list[Pattern]:
    return patterns_per_head(DEFAULT_PATTERN if pattern is None else pattern, n_heads)


def _check_block(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def estimate(q, k, pattern=None, *, causal: bool = True, scale=None, block_m: int = 64,
             block_n: int = 64) -> SparseLayout:
    """Estimate the SparseLayout of ``pattern`` (one for all heads, or a list of one per query head) from
    ``q [B, Hq, Lq, D]`` and ``k [B, Hkv, Lk, D]``.  Heads are handled together per pattern family."""
    check_attention_inputs(q, k, k)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    patterns = _patterns_per_head(pattern, q.shape[1])
    scale = resolve_scale(scale, q.shape[-1])
    groups: dict = {}
    for head, p in enumerate(patterns):
        groups.setdefault(p.group_key(), []).append(head)
    layouts, order = [], []
    for heads in groups.values():
        family = type(patterns[heads[0]])
        index = host_tensor(heads, dtype=torch.long, device=q.device)          # no stream sync on a GPU
        layouts.append(family.build([patterns[h] for h in heads], index, q, k, causal=causal, scale=scale,
                                    block_m=block_m, block_n=block_n))
        order.extend(heads)
    layout = layouts[0] if len(layouts) == 1 else concat_heads(layouts)
    if order != sorted(order):
        inverse = sorted(range(len(order)), key=order.__getitem__)
        layout = layout.select_heads(host_tensor(inverse, dtype=torch.long, device=q.device))
    return layout


def sparse_attention(q, k, v, layout: SparseLayout, *, causal: bool = True, scale=None, backend: str = "auto",
                     return_lse: bool = False, check_layout: bool = True):
    """Attention of ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, Lk, D]``, each query block seeing only the keys its
    ``layout`` lists (and, with ``causal``, only keys at or before its position; queries are the last Lq keys).

    Returns ``out [B, Hq, Lq, D]`` in q's dtype, and with ``return_lse`` also the natural-log LSE ``[B, Hq, Lq]``
    (fp32; -inf and output 0 for a row that sees no key).  ``check_layout`` validates the indices (one host sync);
    layouts from `estimate` are valid by construction."""
    check_attention_inputs(q, k, v)
    if not isinstance(layout, SparseLayout):
        raise ValueError(f"layout must be a SparseLayout, got {type(layout).__name__}")
    check_layout_matches(layout, q, k)
    if check_layout:
        layout.check_indices()
    scale = resolve_scale(scale, q.shape[-1])
    chosen = _resolve_backend(backend, q, k, v, layout)
    if chosen == "cpu":
        return cpu_kernel.cpu_kernel_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse)
    if chosen == "flex":
        from .ops.flex import flex_sparse_attention
        return flex_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse)
    if chosen == "triton":
        from .ops.triton_launch import triton_sparse_attention
        return triton_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse)
    if chosen == "cuda":
        from .ops.cuda import cuda_sparse_attention
        return cuda_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse)
    return torch_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=return_lse)


def sparse_prefill(q, k, v, pattern=None, *, causal: bool = True, scale=None, backend: str = "auto",
                   dense_below: int | None = None):
    """Estimate per-head layouts and run sparse attention: ``out [B, Hq, Lq, D]``.

    Key lengths below ``dense_below`` (default `DENSE_BELOW`) and all-`Dense` patterns run dense attention, and so
    does an estimated layout the chosen backend would run slower than dense (`dense_guard`)."""
    check_attention_inputs(q, k, v)
    patterns = _patterns_per_head(pattern, q.shape[1])
    threshold = DENSE_BELOW if dense_below is None else dense_below
    chosen = _resolve_backend(backend, q, k, v)
    if k.shape[2] < threshold or all(isinstance(p, Dense) for p in patterns):
        return dense_attention(q, k, v, causal=causal, scale=scale)
    layout = estimate(q, k, patterns, causal=causal, scale=scale)
    if sparse_is_slower(layout, chosen, causal=causal):        # never slower than dense (`dense_guard`)
        return dense_attention(q, k, v, causal=causal, scale=scale)
    return sparse_attention(q, k, v, layout, causal=causal, scale=scale, backend=backend, check_layout=False)


def dense_attention(q, k, v, *, causal: bool = True, scale=None):
    """Dense attention through PyTorch SDPA, bottom-right causal, GQA without repeating KV."""
    check_attention_inputs(q, k, v)
    Lq, Lk = q.shape[2], k.shape[2]
    mask = None
    if causal and Lq != Lk:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(Lq, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and Lq == Lk,
                                          scale=resolve_scale(scale, q.shape[-1]),
                                          enable_gqa=q.shape[1] != k.shape[1])


def _resolve_backend(backend: str, q, k, v, layout=None) -> str:
    """"auto" -> "triton" on CUDA tensors the Triton kernel supports (triton importable, dtype, head dim); "cpu"
    (the compiled C++ kernel) on CPU tensors of fp32/fp16/bf16 where it builds; else "torch" (the Triton
    interpreter is for tests).  "flex" compiles per shape, so it is opt-in."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":       # fail early, even where a short input would run dense
        from .ops.triton_launch import triton_not_supported_reasons
        reasons = triton_not_supported_reasons(q, k, v, layout)
        if reasons:
            raise ValueError("backend='triton' cannot run these inputs: " + "; ".join(reasons))
    if backend == "cpu" and not cpu_kernel.supports(q):
        raise ValueError(f"backend='cpu' takes CPU tensors of fp32, fp16 or bf16, got {q.dtype} on {q.device}")
    if backend != "auto":
        return backend
    if q.device.type == "cuda":
        from .ops.triton_launch import triton_not_supported_reasons      # no triton import: a spec lookup
        if not triton_not_supported_reasons(q, k, v, layout):
            return "triton"
    if cpu_kernel.supports(q) and cpu_kernel.available():
        return "cpu"
    return "torch"
