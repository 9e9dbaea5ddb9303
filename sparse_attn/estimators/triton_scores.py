"""Launcher of the estimator score kernels (`triton_scores`): the last-query sample's column and diagonal mass
without materialising its probabilities, and no host synchronisation (every size is known on the host).

Same contract as the torch reference in `estimators.sample_mass` (``last_query_probs`` then ``column_mass`` /
``diagonal_mass``), which stays the readable version and the CPU path.  On CPU tensors the kernels run in
Triton's interpreter (``TRITON_INTERPRET=1`` set before this module's kernels are first used), as for
`backends.triton.launcher`.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from ..backends.triton.launcher import _next_pow2, triton_not_supported_reasons
from ..errors import InvalidArgumentError
from ..layout import ceil_div

_KERNEL_MODULE = __package__ + ".triton_scores_kernel"
#: Keys per program of the row-statistics pass: enough programs to fill a GPU at long lengths, few partials.
STATS_CHUNK = 2048


def _kernels():
    from . import triton_scores_kernel as triton_scores
    return triton_scores


def _interpreted() -> bool | None:
    module = sys.modules.get(_KERNEL_MODULE)
    return None if module is None else type(module.sample_mass_kernel).__name__ == "InterpretedFunction"


def _has_gather() -> bool:
    import triton.language as tl
    return hasattr(tl, "gather")                     # Triton >= 3.3


def scores_not_supported_reasons(q, k, last_q, heads=None) -> list[str]:
    """Every reason why the score kernels cannot run these inputs (empty: they can).  Reads no tensor data."""
    reasons = triton_not_supported_reasons(q, k, k)
    if isinstance(q, torch.Tensor) and q.device.type == "cpu" and _interpreted() is False:
        reasons.append("TRITON_INTERPRET=1 was set after the score kernels were compiled for the GPU")
    if not isinstance(last_q, int) or isinstance(last_q, bool) or last_q < 1:
        reasons.append(f"last_q must be an int >= 1, got {last_q!r}")
    if heads is not None:
        if not isinstance(heads, torch.Tensor) or heads.dim() != 1 or heads.dtype not in (torch.int32, torch.int64):
            reasons.append("heads must be a 1-d int32/int64 tensor of query head indices")
        elif isinstance(q, torch.Tensor) and heads.device != q.device:
            reasons.append(f"heads must be on q's device ({q.device}), got {heads.device}")
    return reasons


def _launch_config(head_dim: int, dtype: torch.dtype, n: int, on_gpu: bool, block_n: int | None = None) -> dict:
    """Blocks and warps: 64 sample rows x 64 keys per step for 16-bit inputs (32 keys at D = 256), IEEE fp32 dots
    on smaller tiles for fp32 (so results match the fp32 reference; those sizes are register limits, so the
    interpreter, which pays per program, takes 64 keys); never more rows than keys (the skew of the diagonal
    reduction needs BLOCK_M <= BLOCK_N), never more rows than the sample (padded, >= 16 for tl.dot).
    ``block_n`` overrides the key step (tests: several row blocks per sample).  8 warps: with 4, the mass kernel
    spills at 16-bit D <= 128 on sm_90 (the skewed [64, 128] fp32 tile); with 8 it uses <= 213 registers and
    spills nothing (`bench/triton_scores_compile_check.py`, Triton 3.9)."""
    block_d = max(16, _next_pow2(head_dim))
    two_byte = dtype in (torch.float16, torch.bfloat16)
    step = (64 if block_d <= 128 else 32) if two_byte else (32 if block_d <= 64 else 16)
    step = block_n or (step if on_gpu else 64)
    return dict(BLOCK_D=block_d, BLOCK_M=min(step, max(16, _next_pow2(n))), BLOCK_N=step,
                DOT_PRECISION="tf32" if two_byte else "ieee", num_warps=8)


class SampleScores:
    """Column and diagonal mass of the last ``n = min(last_q, Lq)`` queries; see `triton_sample_scores`.

    ``column``, ``column_off_local``, ``diagonal``: [B, Hs, Lk] fp32.  `on_diagonals` adds the gamma-mode score."""

    def __init__(self, q, k, heads, n, qk_scale, causal, cfg, row_lse, column, column_off_local, diagonal):
        self._args = (q, k, heads, n, qk_scale, causal, cfg, row_lse)
        self.column, self.column_off_local, self.diagonal = column, column_off_local, diagonal

    def on_diagonals(self, picked: torch.Tensor, group: int) -> torch.Tensor:
        """Column mass lying on chosen diagonal groups: ``picked [B, Hs, n_groups + 1]`` (bool; group ``g`` holds
        distances ``[g * group, (g + 1) * group)``, the last slot must be False) -> [B, Hs, Lk] fp32.  Torch
        equivalent: ``column_mass(probs * picked[:, :, (pos - key) // group])`` (negative distances: last slot)."""
        q, k, heads, n, qk_scale, causal, cfg, row_lse = self._args
        B, Lk = q.shape[0], k.shape[2]
        if row_lse is None:                                     # empty sample
            return torch.zeros(B, heads.shape[0], Lk, dtype=torch.float32, device=q.device)
        if picked.shape[:2] != (B, heads.shape[0]) or picked.dim() != 3:
            raise InvalidArgumentError(f"picked must be [B, Hs, n_groups + 1] = [{B}, {heads.shape[0]}, ...], "
                             f"got {tuple(picked.shape)}")
        out = torch.empty(B, heads.shape[0], Lk, dtype=torch.float32, device=q.device)
        _mass(q, k, heads, n, qk_scale, causal, cfg, row_lse, heads, heads, picked.to(torch.int8).contiguous(),
              (out, out, out), mode=1, group=group, use_gather=False)
        return out


def triton_sample_scores(q, k, last_q: int, scale: float, causal: bool = True, *, heads=None, sink=None,
                         local=None, stats_chunk: int = STATS_CHUNK, use_gather: bool | None = None,
                         block_n: int | None = None) -> SampleScores:
    """Scores of the last ``n = min(last_q, Lq)`` queries of ``q [B, Hq, Lq, D]`` against ``k [B, Hkv, Lk, D]``
    (softmax over all keys, causal inside the sample with bottom-right alignment), for the query heads ``heads``
    (long [Hs] on q's device, default all; range-checked on the CPU only, where the check costs no sync):

    * ``column [B, Hs, Lk]``: attention mass per key, summed over the sample rows;
    * ``column_off_local``: the same without the entries at distance ``0 <= pos - key < local[h]``;
    * ``diagonal [B, Hs, Lk]``: mass per distance ``d = pos - key >= 0``, without the keys ``< sink[h]``.

    ``sink``, ``local``: int tensors [Hs] on q's device (default 0).  Raises one ValueError with every reason
    the inputs are not supported.  ``stats_chunk`` (keys per program of the first pass), ``use_gather``
    (default: when Triton has tl.gather) and ``block_n`` (key step, a power of two >= 16) are for tests."""
    reasons = scores_not_supported_reasons(q, k, last_q, heads)
    if reasons:
        raise InvalidArgumentError("triton sample scores cannot run these inputs: " + "; ".join(reasons))
    B, Hq, Lq, D = q.shape
    Lk, dev = k.shape[2], q.device
    heads = torch.arange(Hq, device=dev) if heads is None else heads
    if dev.type == "cpu" and bool(((heads < 0) | (heads >= Hq)).any()):    # on a GPU this read would be a sync
        raise InvalidArgumentError(f"heads must index the {Hq} query heads, got {heads.tolist()}")
    Hs = heads.shape[0]
    zeros = torch.zeros(Hs, dtype=torch.int32, device=dev)
    sink, local = (zeros if t is None else t.to(torch.int32).contiguous() for t in (sink, local))
    if sink.shape != (Hs,) or local.shape != (Hs,):
        raise InvalidArgumentError(f"sink and local must be [Hs] = [{Hs}] tensors, got {tuple(sink.shape)}, "
                         f"{tuple(local.shape)}")
    n, qk_scale = min(last_q, Lq), float(scale) * 1.4426950408889634                   # log2(e): exp2 form
    heads = heads.to(torch.int32).contiguous()
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise InvalidArgumentError(f"block_n must be a power of two >= 16, got {block_n}")
    cfg = _launch_config(D, q.dtype, n, dev.type == "cuda", block_n)
    column, column_off, diagonal = (torch.empty(B, Hs, Lk, dtype=torch.float32, device=dev) for _ in range(3))
    diagonal.zero_()
    if B * Hs * n == 0:
        column.zero_(), column_off.zero_()
        return SampleScores(q, k, heads, n, qk_scale, causal, cfg, None, column, column_off, diagonal)
    row_lse = _row_lse(q, k, heads, n, qk_scale, causal, cfg, stats_chunk)
    _mass(q, k, heads, n, qk_scale, causal, cfg, row_lse, sink, local, sink, (column, column_off, diagonal),
          mode=0, group=1, use_gather=_has_gather() if use_gather is None else use_gather)
    return SampleScores(q, k, heads, n, qk_scale, causal, cfg, row_lse, column, column_off, diagonal)


def _device(q):
    return torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()


def _row_lse(q, k, heads, n, qk_scale, causal, cfg, chunk):
    """log2-sum-exp of each sample row's scaled logits: [B * Hs, n] fp32 (pass 1, then a fold of the chunks)."""
    B, Hs, Lk = q.shape[0], heads.shape[0], k.shape[2]
    chunk = max(cfg["BLOCK_N"], ceil_div(chunk, cfg["BLOCK_N"]) * cfg["BLOCK_N"])
    n_chunks = ceil_div(Lk, chunk)
    row_max = torch.empty(B * Hs, n_chunks, n, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    grid = (n_chunks, ceil_div(n, cfg["BLOCK_M"]), B * Hs)
    with _device(q):
        _kernels().sample_row_stats_kernel[grid](
            q, k, heads, row_max, row_sum, *q.stride(), *k.stride(), Hs, q.shape[1] // k.shape[1], q.shape[2],
            Lk, n, chunk, n_chunks, qk_scale, HEAD_DIM=q.shape[-1], CAUSAL=bool(causal), **cfg)
    top = row_max.amax(1, keepdim=True)
    top = torch.where(torch.isinf(top), 0.0, top)                    # a row that sees nothing: sum 0, lse -inf
    return (row_sum * torch.exp2(row_max - top)).sum(1).log2() + top[:, 0]


def _mass(q, k, heads, n, qk_scale, causal, cfg, row_lse, sink, local, picked, outs, *, mode, group, use_gather):
    B, Hs, Lk = q.shape[0], heads.shape[0], k.shape[2]
    grid = (ceil_div(Lk, cfg["BLOCK_N"]), B * Hs)
    with _device(q):
        _kernels().sample_mass_kernel[grid](
            q, k, heads, row_lse, sink, local, picked, *outs, *q.stride(), *k.stride(), Hs,
            q.shape[1] // k.shape[1], q.shape[2], Lk, n, group, picked.shape[-1] - 1 if mode == 1 else 0,
            qk_scale, HEAD_DIM=q.shape[-1], CAUSAL=bool(causal), MODE=mode, USE_GATHER=bool(use_gather), **cfg)
