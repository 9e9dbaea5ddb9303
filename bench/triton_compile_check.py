"""Compile the Triton sparse attention kernel for a GPU target without a GPU, for every dtype x head dim x causal
configuration the launcher can pick, and print registers, spills and shared memory (from ptxas -v).

    PYTHONPATH=. python bench/triton_compile_check.py [--arch 90] [--dims 64 80 96 128 256] [--dtypes fp16 bf16]

Catches what the interpreter cannot (type errors of the real compiler, register spills of a launch heuristic).
Needs triton and its bundled ptxas; no GPU.  TRITON_INTERPRET must be off (it is removed here)."""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from sparse_attn.backends.triton.launcher import launch_config  # noqa: E402

_POINTERS = ("Q", "K", "V", "Out")
_INDEXES = ("BlockCount", "BlockOffset", "ColumnCount", "ColumnIndex")
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_one(dtype, head_dim: int, causal: bool, arch: int, block_m: int = 64, block_n: int = 64,
                softcap: bool = False, **override):
    """Compile one specialisation (unit head-dim strides, as for contiguous inputs; ``override`` replaces launch
    settings); return (compiled kernel, launch options, block sizes, seconds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparse_attn.backends.triton.kernel import sparse_attention_kernel as kernel

    cfg = {**launch_config(head_dim, dtype, block_m, block_n, arch // 10), **override}
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    const = {**dict(HEAD_DIM=head_dim, TILE_M=block_m, TILE_N=block_n, CAUSAL=causal, WRITE_LSE=True,
                    SOFTCAP=softcap), **cfg}
    const.update({f"stride_{t}_d": 1 for t in "qkvo"})
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in const:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = "*" + _TYPES[dtype]
        elif name in _INDEXES:
            signature[name] = "*i32"
        else:
            signature[name] = {"Lse": "*fp32", "qk_scale": "fp32", "softcap_log2": "fp32"}.get(name, "i32")
    # What a launch on contiguous inputs specialises: 16-byte aligned pointers, strides divisible by 16 (sizes are
    # not specialised, see the kernel).
    aligned = [n for n in names if signature[n].startswith("*") or (n.startswith("stride_") and n not in const)]
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in const.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch)
    return compiled, launch, cfg, time.perf_counter() - start


def ptxas_report(ptx: str, arch: int) -> str:
    """'N regs, S spill bytes' from the ptxas bundled with triton."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path                                   # the one triton itself uses for this arch
    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1) if regs else '?'} regs, {spills.group(1) if spills else '?'} B spilled"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 80, 96, 128, 256])
    parser.add_argument("--dtypes", nargs="+", default=list(_TYPES.values()), choices=list(_TYPES.values()))
    parser.add_argument("--softcap", action="store_true", help="the soft-capping specialisation")
    args = parser.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}, target sm_{args.arch}")
    print(f"{'dtype':6} {'D':>4} {'causal':>6} {'BLOCK_MxN':>9} {'warps':>5} {'stages':>6} {'smem':>7}  ptxas"
          f"{'':22} compile s")
    for dtype in (t for t, name in _TYPES.items() if name in args.dtypes):
        for d in args.dims:
            for causal in (True, False):
                compiled, launch, cfg, secs = compile_one(dtype, d, causal, args.arch, softcap=args.softcap)
                print(f"{_TYPES[dtype]:6} {d:>4} {str(causal):>6} {cfg['BLOCK_M']:>4}x{cfg['BLOCK_N']:<4} "
                      f"{launch['num_warps']:>5} {launch['num_stages']:>6} {compiled.metadata.shared:>7}  "
                      f"{ptxas_report(compiled.asm['ptx'], args.arch):27} {secs:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
