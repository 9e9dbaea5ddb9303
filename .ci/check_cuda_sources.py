"""Compile-only check of every csrc/*.cu for every specialisation the loader can request (nvcc, sm_90 PTX, no
device optimisation: front end and PTX checks only, a few seconds).  Skips with a message when nvcc is absent."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sparse_attn.backends.cuda.launcher import kernel_specialisations
from sparse_attn.backends.jit import define_options

root = Path(__file__).resolve().parents[1]
nvcc = shutil.which("nvcc")
if nvcc is None:
    print("CUDA sources: nvcc not on PATH, compile check skipped")
    sys.exit(0)
jobs = [(name, defines) for name, specs in kernel_specialisations().items() for defines in specs]
start = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
    def compile_one(i_job):
        i, (name, defines) = i_job
        cmd = [nvcc, "-arch=sm_90", "--ptx", "-Xcicc", "-O0", *define_options(defines), str(root / "csrc" / name),
               "-o", os.path.join(tmp, f"{i}.ptx")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        return f"{name} {defines}", done.returncode, done.stderr

    failed = [(what, err) for what, rc, err in pool.map(compile_one, enumerate(jobs)) if rc != 0]
for what, err in failed:
    print(f"CUDA sources: {what} FAILED\n{err}")
print(f"CUDA sources: {len(jobs) - len(failed)}/{len(jobs)} specialisations compiled with nvcc "
      f"({time.perf_counter() - start:.1f} s)")
sys.exit(1 if failed else 0)
