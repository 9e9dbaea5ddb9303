"""Launcher of the Triton sparse attention kernel (`triton_attention`): input checks, launch heuristic, launch.

Triton is imported only when a kernel runs, never at ``import sparse_attn``.  On CPU tensors the kernel runs in
Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before the kernel module is first
imported: ``@triton.jit`` picks compiled or interpreted code at decoration time.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import torch

from ...layout import SparseLayout, ceil_div
from ..checks import attention_input_reasons, check_layout_matches, resolve_scale
from ...errors import InvalidArgumentError

#: Input dtypes the kernel takes (fp32 accumulation inside; fp32 inputs use IEEE fp32 dots, not TF32).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Head dims: multiples of 8 in [16, 256] (64, 80, 96, 128, 256 ...), padded to a power of two inside with masks.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
#: Widest layout tile: a tile is walked in unrolled steps of BLOCK_N keys.
MAX_TILE_N = 512
#: CUDA's limit on the second grid dimension, which holds batch x query heads.
MAX_GRID_Y = 65535

_KERNEL_MODULE = __package__ + ".kernel"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def launch_config(head_dim: int, dtype: torch.dtype, block_m: int, block_n: int, capability: int = 9) -> dict:
    """Block sizes, warps and dot precision, keyed on the padded head dim, the dtype and the GPU generation
    (``capability``: compute capability major, 9 = H100/H200).  No autotuning; checked for register spills and
    shared memory by compiling every case for sm_90 (``bench/triton_compile_check.py``):

    * 16-bit inputs: 64 query rows x 64 keys per step (FlashAttention-2's tile for D <= 128), 32 keys at D = 256;
      4 warps (one Hopper warp group), 8 at D = 256 and, before Hopper, at D >= 128; 3 pipeline stages at D <= 64,
      else 2.  No spills on sm_90 for D in {64, 80, 96, 128, 256}.
    * fp32 inputs: IEEE fp32 dots (not TF32, so results match an fp32 reference); these run on FMA units and
      need smaller tiles: 32 rows x 32 keys up to D = 64, 32 x 16 above.  A correctness path, not a fast one.
    * ``BLOCK_M`` never exceeds the layout's (padded) ``block_m`` (a wider query block is split over programs),
      ``BLOCK_N`` never its ``block_n`` (a wider tile is walked in steps); both at least tl.dot's minimum, 16.
    """
    block_d = max(16, _next_pow2(head_dim))
    two_byte = dtype in (torch.float16, torch.bfloat16)
    if two_byte:
        rows, step = 64, (64 if block_d <= 128 else 32)
        warps = 8 if block_d >= 256 or (block_d >= 128 and capability < 9) else 4
        stages = 3 if block_d <= 64 else 2
    else:
        rows, step, warps, stages = 32, (32 if block_d <= 64 else 16), (8 if block_d >= 256 else 4), 2
    return dict(BLOCK_D=block_d, BLOCK_M=min(rows, max(16, _next_pow2(block_m))),
                BLOCK_N=min(step, max(16, _next_pow2(block_n))), DOT_PRECISION="tf32" if two_byte else "ieee",
                num_warps=warps, num_stages=stages)


def _kernel_is_interpreted() -> bool | None:
    """Whether the imported kernel module was built for the interpreter (None: not imported yet)."""
    module = sys.modules.get(_KERNEL_MODULE)
    if module is None:
        return None
    return type(module.sparse_attention_kernel).__name__ == "InterpretedFunction"


def triton_not_supported_reasons(q, k, v, layout=None) -> list[str]:
    """Every reason why ``backend="triton"`` cannot run these inputs (empty list: it can).  Does not import
    triton or read any tensor data."""
    reasons = attention_input_reasons(q, k, v)
    if not triton_available():
        reasons.append("triton is not installed (pip install triton), use backend='torch'")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return reasons
    if q.device.type == "cpu":
        if not interpreter_enabled():
            reasons.append("q is a CPU tensor: backend='triton' runs on CUDA tensors, or on CPU tensors only under "
                           "TRITON_INTERPRET=1 (set before the kernel is first used); use backend='torch' on the CPU")
        elif _kernel_is_interpreted() is False:
            reasons.append("TRITON_INTERPRET=1 was set after the Triton kernel was compiled for the GPU; set it "
                           "before the first use of backend='triton'")
        if q.dtype == torch.bfloat16:
            reasons.append("dtype bfloat16 cannot be checked under TRITON_INTERPRET (the interpreter's tl.dot "
                           "multiplies bf16 bit patterns); use fp16/fp32 there or a GPU")
    elif q.device.type != "cuda":
        reasons.append(f"q is on {q.device}: backend='triton' needs CUDA tensors (or CPU under TRITON_INTERPRET=1)")
    if q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype must be float16, bfloat16 or float32 for backend='triton', got {q.dtype}")
    D = q.shape[-1]
    if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM and D % 8 == 0):
        reasons.append(f"head_dim must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] for backend='triton' "
                       f"(e.g. 64, 80, 96, 128, 256), got {D}")
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        reasons.append(f"batch x query heads ({q.shape[0] * q.shape[1]}) must be <= {MAX_GRID_Y} for "
                       f"backend='triton'")
    if layout is not None:
        if not isinstance(layout, SparseLayout):
            reasons.append(f"layout must be a SparseLayout, got {type(layout).__name__}")
        elif layout.block_n > MAX_TILE_N:
            reasons.append(f"layout.block_n must be <= {MAX_TILE_N} for backend='triton', got {layout.block_n}")
    return reasons


def triton_sparse_attention(q, k, v, layout: SparseLayout, *, causal: bool = True, scale=None,
                            return_lse: bool = False, softcap: float = 0.0):
    """Attention of ``q [B, Hq, Lq, D]`` over the keys ``layout`` lists in ``k, v [B, Hkv, Lk, D]`` (any strides;
    query head h reads KV head ``h // (Hq // Hkv)``), with the bottom-right causal mask when ``causal``.

    Same contract as `backends.torch.attention.torch_sparse_attention`: returns ``out [B, Hq, Lq, D]`` in q's dtype and, with
    ``return_lse``, the natural-log LSE ``[B, Hq, Lq]`` in fp32; a row with no visible key gets output 0 and LSE
    -inf.  ``scale`` defaults to ``D ** -0.5``.  Raises one ValueError listing every unsupported property.  The
    layout's indices are not validated here (`sparse_attention` does that); keys outside ``[0, Lk)`` are
    masked in the kernel, but a key listed twice would count twice.  ``softcap > 0``: scores capped to
    ``softcap * tanh(s / softcap)``."""
    reasons = triton_not_supported_reasons(q, k, v, layout)
    if reasons:
        raise InvalidArgumentError("backend='triton' cannot run these inputs: " + "; ".join(reasons))
    check_layout_matches(layout, q, k)
    scale = resolve_scale(scale, q.shape[-1])
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device) if return_lse else \
        torch.empty(1, dtype=torch.float32, device=q.device)                      # unused, not a null pointer
    if B * Hq * Lq == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out

    from .kernel import sparse_attention_kernel

    if q.device.type == "cpu" and not _kernel_is_interpreted():
        raise InvalidArgumentError("backend='triton': the kernel module was imported before TRITON_INTERPRET=1 was set")
    # Tiny int32 index tensors: made contiguous (engines pass row slices), and never 0 wide (no null pointers).
    counts = [layout.block_count.contiguous(), layout.column_count.contiguous()]
    offsets, columns = (t if t.shape[-1] else t.new_zeros(*t.shape[:-1], 1)
                        for t in (layout.block_offset, layout.column_index))
    offsets, columns = offsets.contiguous(), columns.contiguous()
    capability = torch.cuda.get_device_capability(q.device)[0] if q.device.type == "cuda" else 9
    cfg = launch_config(D, q.dtype, layout.block_m, layout.block_n, capability)
    split_m = ceil_div(layout.block_m, cfg["BLOCK_M"])
    grid = (layout.num_query_blocks * split_m, B * Hq)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        sparse_attention_kernel[grid](
            q, k, v, out, lse, counts[0], offsets, counts[1], columns,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            Hq, Hq // Hkv, Lq, Lk, layout.num_query_blocks, offsets.shape[-1], columns.shape[-1],
            scale * 1.4426950408889634, float(softcap) * 1.4426950408889634,      # log2(e): exp2 form
            HEAD_DIM=D, TILE_M=layout.block_m, TILE_N=layout.block_n, CAUSAL=bool(causal), WRITE_LSE=return_lse,
            SOFTCAP=bool(softcap), **cfg)
    return (out, lse) if return_lse else out
