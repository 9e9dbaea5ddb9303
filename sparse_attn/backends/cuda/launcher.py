"""backend="cuda": the CUDA sources in ``csrc/``, compiled by CuPy (NVRTC) on first use, launched on torch tensors.

* Loader: `kernel_cache` compiles each (source, specialisation) once per machine (`jit.KernelCache`: memo,
  disk cache under ``$SPARSE_ATTN_CACHE`` or ``~/.cache/sparse_attn``, file lock against concurrent builders).
* Launch: on torch's current stream (``cupy.cuda.ExternalStream``), outputs allocated by torch, tensors passed as
  raw device pointers (zero-copy; bf16 and fp16 travel as 16-bit words the kernel converts), scalars as numpy
  values of the kernel's parameter types.
* Errors: `cuda_unavailable_reasons` collects every reason the backend cannot run (no CuPy, no GPU, tensors not
  on CUDA, unsupported dtype or head dim) and one `CudaBackendError` names them all.

Nothing here imports CuPy at module import; ``import sparse_attn`` never touches CUDA.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ...layout import SparseLayout
from ..checks import attention_input_reasons, check_layout_matches, resolve_scale
from .. import jit
from ..jit import KernelCache
from ...errors import InvalidArgumentError, NotSupportedError
from .vertical_slash_args import check_vertical_slash_args, vertical_slash_output_sizes
from ...layout import ceil_div

#: dtype -> the SA_DTYPE define of csrc/sparse_attention.cu
ATTENTION_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
ATTENTION_HEAD_DIMS = (64, 80, 96, 128, 256)
ATTENTION_SOURCE, ATTENTION_KERNEL = "sparse_attention.cu", "sparse_attention_fwd"
INDEX_SOURCE, INDEX_KERNEL = "vertical_slash_index.cu", "vertical_slash_to_layout"
# Mirrors of the kernels' compile-time constants (csrc/sparse_attention.cu).
_ATT_ROWS, _ATT_KEYS, _ATT_THREADS = 64, 32, 256
_INDEX_THREADS = 128
_MAX_GRID_YZ = 65535


class CudaBackendError(NotSupportedError, RuntimeError):
    """The CUDA backend cannot run these inputs here; the message lists every reason."""


def kernel_specialisations() -> dict:
    """Every (source file -> list of define sets) the loader can request: what CI compile-checks."""
    attention = [{"SA_DTYPE": code, "SA_HEAD_DIM": d} for code in ATTENTION_DTYPES.values()
                 for d in ATTENTION_HEAD_DIMS]
    return {ATTENTION_SOURCE: attention, INDEX_SOURCE: [{}]}


def source_dir() -> Path:
    try:
        return jit.source_dir()
    except FileNotFoundError as err:
        raise CudaBackendError(str(err)) from None


# ---------------------------------------------------------------------------------------------------- environment
def _import_cupy():
    import cupy

    return cupy


def cuda_unavailable_reasons(tensors: dict | None = None) -> list[str]:
    """Every reason the CUDA backend cannot run on ``tensors`` (name -> tensor); empty when it can."""
    reasons = []
    try:
        _import_cupy()
    except ImportError as e:
        reasons.append(f"CuPy is not installed ({e}); install cupy-cuda12x or cupy-cuda13x to match your CUDA")
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    for name, t in (tensors or {}).items():
        if isinstance(t, torch.Tensor) and t.device.type != "cuda":
            reasons.append(f"{name} is on {t.device}; the CUDA backend needs CUDA tensors")
    return reasons


def _raise_if(reasons: list[str], what: str) -> None:
    if reasons:
        raise CudaBackendError(f"{what}: " + "; ".join(reasons))


# ---------------------------------------------------------------------------------------------------- loader
def nvrtc_compile(source: str, options: tuple, arch: str) -> bytes:
    """Compile with NVRTC (CuPy's bindings; no GPU needed): a cubin for ``arch`` when NVRTC knows it, else PTX
    for the newest arch it knows below (the driver JIT-compiles that)."""
    from cupy_backends.cuda.libs import nvrtc

    known = sorted(int(a) for a in nvrtc.getSupportedArchs())
    cubin = int(arch) in known
    target = f"sm_{arch}" if cubin else f"compute_{max([a for a in known if a <= int(arch)] or known[:1])}"
    program = nvrtc.createProgram(source, "sparse_attn.cu", (), ())
    try:
        try:
            nvrtc.compileProgram(program, (*options, f"-arch={target}"))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC could not compile with {(*options, f'-arch={target}')}:\n"
                               f"{nvrtc.getProgramLog(program)}") from e
        binary = nvrtc.getCUBIN(program) if cubin else nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    return binary.encode() if isinstance(binary, str) else bytes(binary)


def load_raw_module(path: str):
    return _import_cupy().RawModule(path=path)


def _toolchain() -> str:
    cupy = _import_cupy()
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc_version = ".".join(map(str, nvrtc.getVersion()))
    except Exception:                     # the version only refines the cache key
        nvrtc_version = "?"
    return f"cupy-{cupy.__version__}-nvrtc-{nvrtc_version}"


@functools.lru_cache(maxsize=1)
def kernel_cache() -> KernelCache:
    """The process-wide cache (directory resolved from ``$SPARSE_ATTN_CACHE`` at each load)."""
    return KernelCache(nvrtc_compile, load_raw_module, toolchain=_toolchain())


def _arch(device_index: int) -> str:
    cc = _import_cupy().cuda.Device(device_index).compute_capability     # e.g. "90"
    return str(cc)


def get_kernel(source_name: str, kernel_name: str, defines: dict, device_index: int):
    """The compiled kernel ``kernel_name`` of ``csrc/<source_name>`` specialised by ``defines``."""
    cupy = _import_cupy()
    source = (source_dir() / source_name).read_text()
    with cupy.cuda.Device(device_index):
        module = kernel_cache().load(source_name, source, defines, _arch(device_index), device=device_index)
        return module.get_function(kernel_name)


def _launch(kernel, grid: tuple, block: tuple, args: tuple, device_index: int, shared_mem: int = 0) -> None:
    cupy = _import_cupy()
    stream = torch.cuda.current_stream(device_index).cuda_stream
    with cupy.cuda.Device(device_index), cupy.cuda.ExternalStream(stream):
        if shared_mem > 48 * 1024:         # above the default dynamic shared memory limit: opt in
            kernel.max_dynamic_shared_size_bytes = shared_mem
        kernel(grid, block, args, shared_mem=shared_mem)


def _ptr(t: torch.Tensor):
    import numpy as np

    return np.uint64(t.data_ptr())


# ---------------------------------------------------------------------------------------------------- attention
def attention_shared_bytes(head_dim: int) -> int:
    """Dynamic shared memory of csrc/sparse_attention.cu: Q and K (fp32, row stride D + 1), V, key positions."""
    return 4 * ((_ATT_ROWS + _ATT_KEYS) * (head_dim + 1) + _ATT_KEYS * head_dim + _ATT_KEYS)


def attention_launch_args(q, k, v, out, lse, index: tuple, layout: SparseLayout, scale: float, causal: bool,
                          softcap: float = 0.0):
    """The kernel arguments of ``sparse_attention_fwd``, in its parameter order and types.  ``index``: the four
    layout tensors, contiguous int32; ``lse`` None when not wanted (a null pointer the kernel never reads)."""
    import numpy as np

    block_count, block_offset, column_count, column_index = index
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    strides = [np.int64(s) for t in (q, k, v) for s in t.stride()]
    return (_ptr(q), _ptr(k), _ptr(v), _ptr(out), np.uint64(0) if lse is None else _ptr(lse),
            _ptr(block_count), _ptr(block_offset), _ptr(column_count), _ptr(column_index), *strides,
            np.int32(Hq), np.int32(Hq // Hkv), np.int32(Lq), np.int32(Lk), np.int32(layout.num_query_blocks),
            np.int32(block_offset.shape[-1]), np.int32(column_index.shape[-1]), np.int32(layout.block_m),
            np.int32(layout.block_n), np.float32(scale * 1.4426950408889634),
            np.float32(softcap * 1.4426950408889634), np.int32(bool(causal)),
            np.int32(lse is not None))


def attention_reasons(q, k, v, layout) -> list[str]:
    """Why the CUDA attention kernel cannot take these inputs (environment, device, dtype, head dim, grid)."""
    reasons = cuda_unavailable_reasons({"q": q, "k": k, "v": v, "layout": layout.block_count})
    if q.dtype not in ATTENTION_DTYPES:
        reasons.append(f"q dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if q.shape[-1] not in ATTENTION_HEAD_DIMS:
        reasons.append(f"head_dim {q.shape[-1]} is not supported (one of {ATTENTION_HEAD_DIMS})")
    if q.shape[0] > _MAX_GRID_YZ or q.shape[1] > _MAX_GRID_YZ:
        reasons.append(f"batch ({q.shape[0]}) and query heads ({q.shape[1]}) must be <= {_MAX_GRID_YZ}")
    return reasons


def cuda_sparse_attention(q, k, v, layout: SparseLayout, *, causal: bool = True, scale=None,
                          return_lse: bool = False, softcap: float = 0.0):
    """Same contract as `backends.torch.attention.torch_sparse_attention`: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]``
    (CUDA, fp16/bf16/fp32, any strides), ``layout`` on the same device.  Returns ``out [B, Hq, Lq, D]`` in q's
    dtype and, with ``return_lse``, the natural-log LSE ``[B, Hq, Lq]`` (fp32; -inf, output 0, for a row that
    sees no key).  The layout's indices are trusted (validate with ``layout.check_indices()``).  ``softcap > 0``:
    scores capped to ``softcap * tanh(s / softcap)``."""
    bad = attention_input_reasons(q, k, v)
    if bad:
        raise InvalidArgumentError("invalid attention inputs: " + "; ".join(bad))
    if not isinstance(layout, SparseLayout):
        raise InvalidArgumentError(f"layout must be a SparseLayout, got {type(layout).__name__}")
    _raise_if(attention_reasons(q, k, v, layout), "backend='cuda' cannot run")
    check_layout_matches(layout, q, k)
    scale = resolve_scale(scale, q.shape[-1])
    B, Hq, Lq, D = q.shape
    out = torch.empty(B, Hq, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() and layout.num_query_blocks:
        index = tuple(getattr(layout, n).contiguous() for n in
                      ("block_count", "block_offset", "column_count", "column_index"))
        device = q.device.index if q.device.index is not None else torch.cuda.current_device()
        kernel = get_kernel(ATTENTION_SOURCE, ATTENTION_KERNEL,
                            {"SA_DTYPE": ATTENTION_DTYPES[q.dtype], "SA_HEAD_DIM": D}, device)
        args = attention_launch_args(q, k, v, out, lse, index, layout, scale, causal, softcap)
        _launch(kernel, (layout.num_query_blocks, Hq, B), (_ATT_THREADS,), args, device, attention_shared_bytes(D))
    elif lse is not None:
        lse.fill_(float("-inf"))
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------- indexes
def vertical_slash_launch_args(q_seqlens, kv_seqlens, vertical, slash, outputs: tuple, n_rows: int, max_tiles: int,
                               block_size_M: int, block_size_N: int, causal: bool):
    """The kernel arguments of ``vertical_slash_to_layout`` in its parameter order and types (inputs prepared:
    int32 lengths, int64 sorted vertical / slash indexes, zeroed int32 outputs)."""
    import numpy as np

    heads, nnz_v, nnz_s = vertical.shape[1], vertical.shape[2], slash.shape[2]
    return (_ptr(q_seqlens), _ptr(kv_seqlens), _ptr(vertical), _ptr(slash), *map(_ptr, outputs), np.int32(heads),
            np.int32(n_rows), np.int32(nnz_v), np.int32(nnz_s), np.int32(max_tiles), np.int32(block_size_M),
            np.int32(block_size_N), np.int32(bool(causal)))


def vertical_slash_kernel(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size: int,
                          block_size_M: int, block_size_N: int, causal: bool = True):
    """The CUDA kernel on arguments already checked by `check_vertical_slash_args` (CuPy and a GPU present)."""
    dev = vertical_indexes.device
    batch, heads, nnz_v = vertical_indexes.shape
    nnz_s = slash_indexes.shape[2]
    n_rows, max_tiles = vertical_slash_output_sizes(context_size, block_size_M, block_size_N, nnz_s)
    outputs = (torch.zeros(batch, heads, n_rows, dtype=torch.int32, device=dev),
               torch.zeros(batch, heads, n_rows, max_tiles, dtype=torch.int32, device=dev),
               torch.zeros(batch, heads, n_rows, dtype=torch.int32, device=dev),
               torch.zeros(batch, heads, n_rows, nnz_v, dtype=torch.int32, device=dev))
    if batch * heads * n_rows == 0:
        return outputs
    # The kernel walks verticals ascending and slashes descending (slash ranges then start in ascending order).
    vertical = vertical_indexes.to(device=dev, dtype=torch.int64).sort(-1).values.contiguous()
    slash = slash_indexes.to(device=dev, dtype=torch.int64).sort(-1, descending=True).values.contiguous()
    q_lens = q_seqlens.to(device=dev, dtype=torch.int32).contiguous()
    kv_lens = kv_seqlens.to(device=dev, dtype=torch.int32).contiguous()
    device = dev.index if dev.index is not None else torch.cuda.current_device()
    kernel = get_kernel(INDEX_SOURCE, INDEX_KERNEL, {}, device)
    args = vertical_slash_launch_args(q_lens, kv_lens, vertical, slash, outputs, n_rows, max_tiles, block_size_M,
                                      block_size_N, causal)
    grid = (ceil_div(n_rows, _INDEX_THREADS), heads, batch)
    _launch(kernel, grid, (_INDEX_THREADS,), args, device)
    return outputs


def cuda_convert_vertical_slash_indexes(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size,
                                        block_size_M, block_size_N, causal=True):
    """`integrations.engines.convert_vertical_slash_indexes` (same arguments, same results) on the GPU."""
    check_vertical_slash_args(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size, block_size_M,
                              block_size_N)
    reasons = cuda_unavailable_reasons({"vertical_indexes": vertical_indexes, "slash_indexes": slash_indexes})
    batch, heads = vertical_indexes.shape[:2]
    if batch > _MAX_GRID_YZ or heads > _MAX_GRID_YZ:
        reasons.append(f"batch ({batch}) and heads ({heads}) must be <= {_MAX_GRID_YZ}")
    _raise_if(reasons, "cuda_convert_vertical_slash_indexes cannot run")
    return vertical_slash_kernel(q_seqlens, kv_seqlens, vertical_indexes, slash_indexes, context_size,
                                 block_size_M, block_size_N, causal)
