"""Compile the estimator score kernels (`ops.triton_scores`) for a GPU target without a GPU, for every dtype x head
dim x mode the launcher can pick, and print registers, spills and shared memory (from ptxas -v).

    PYTHONPATH=. python bench/triton_scores_compile_check.py [--arch 90] [--dims 64 80 128 256]

Catches what the interpreter cannot (lowering of tl.gather and atomics, register spills of the launch config).
Needs triton and its bundled ptxas; no GPU.  TRITON_INTERPRET must be off (it is removed here)."""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_compile_check import ptxas_report  # noqa: E402

from sparse_attn.estimators.triton_scores import _launch_config  # noqa: E402

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INT_POINTERS = {"Heads": "*i32", "Sink": "*i32", "Local": "*i32", "Picked": "*i8"}


def compile_one(kernel, dtype, head_dim: int, arch: int, **constexprs):
    """Compile one specialisation (unit head-dim strides); return (compiled kernel, launch config, seconds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = _launch_config(head_dim, dtype, 64, on_gpu=True)
    warps = cfg.pop("num_warps")
    const = dict(HEAD_DIM=head_dim, CAUSAL=True, stride_q_d=1, stride_k_d=1, **cfg, **constexprs)
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in const:
            signature[name] = "constexpr"
        elif name in ("Q", "K"):
            signature[name] = "*" + _TYPES[dtype]
        elif name[0].isupper():
            signature[name] = _INT_POINTERS.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in const.items()})
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
    return compiled, cfg, warps, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 80, 128, 256])
    args = parser.parse_args(argv)
    import triton

    from sparse_attn.estimators.triton_scores_kernel import sample_mass_kernel, sample_row_stats_kernel

    print(f"triton {triton.__version__}, target sm_{args.arch}")
    variants = [(sample_row_stats_kernel, {}), (sample_mass_kernel, dict(MODE=0, USE_GATHER=True)),
                (sample_mass_kernel, dict(MODE=0, USE_GATHER=False)), (sample_mass_kernel, dict(MODE=1,
                                                                                                USE_GATHER=False))]
    for dtype in _TYPES:
        for d in args.dims:
            for kernel, extra in variants:
                compiled, cfg, warps, secs = compile_one(kernel, dtype, d, args.arch, **extra)
                mode = " ".join(f"{k}={v}" for k, v in extra.items())
                print(f"{kernel.fn.__name__:24} {mode:24} {_TYPES[dtype]:5} D={d:<4} {cfg['BLOCK_M']}x{cfg['BLOCK_N']} "
                      f"w{warps} smem {compiled.metadata.shared:>6}  {ptxas_report(compiled.asm['ptx'], args.arch)}"
                      f"  {secs:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
