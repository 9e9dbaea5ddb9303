"""Every csrc/*.cu compiles with nvcc (compile-only, sm_90) for every specialisation the loader can request.
Nothing built here runs: CI machines have nvcc but no GPU.

All specialisations go to PTX without device optimisation (``-Xcicc -O0``: the front end and PTX checks are the
same, ~6x faster); the launch-critical ones are also built optimised to SASS, which must not spill registers."""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sparse_attn.ops.cuda import kernel_specialisations
from sparse_attn.ops.cuda_cache import define_options

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.access("/usr/local/bin/nvcc", os.X_OK) else None)
KERNELS = {"sparse_attention.cu": "sparse_attention_fwd", "vertical_slash_index.cu": "vertical_slash_to_layout"}

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA toolkit absent): "
                                                      "compile-only check of csrc/ skipped")


def test_every_source_and_specialisation_compiles(tmp_path):
    jobs = [(name, defines) for name, specs in kernel_specialisations().items() for defines in specs]
    assert {name for name, _ in jobs} == {p.name for p in CSRC.glob("*.cu")}

    def compile_one(i_job):
        i, (name, defines) = i_job
        ptx = tmp_path / f"{i}.ptx"
        cmd = [NVCC, "-arch=sm_90", "--ptx", "-Xcicc", "-O0", *define_options(defines), str(CSRC / name), "-o",
               str(ptx)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        return name, defines, done.returncode, done.stderr, ptx

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(compile_one, enumerate(jobs)))
    failed = [f"{name} {defines}: {err.strip()[-400:]}" for name, defines, rc, err, _ in results if rc != 0]
    assert not failed, "\n".join(failed)
    for name, defines, _, err, ptx in results:
        assert f".entry {KERNELS[name]}(" in ptx.read_text(), f"{name} {defines}: unmangled kernel entry missing"
        assert "warning" not in err.lower(), f"{name} {defines}: {err}"


@pytest.mark.parametrize("name,defines", [("sparse_attention.cu", {"SA_DTYPE": 1, "SA_HEAD_DIM": 128}),
                                          ("sparse_attention.cu", {"SA_DTYPE": 0, "SA_HEAD_DIM": 256}),
                                          ("vertical_slash_index.cu", {})])
def test_optimised_sass_does_not_spill(tmp_path, name, defines):
    cmd = [NVCC, "-arch=sm_90", "-cubin", "-Xptxas", "-v", *define_options(defines), str(CSRC / name), "-o",
           str(tmp_path / "k.cubin")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in done.stderr, done.stderr


def test_unsupported_specialisation_fails_to_compile(tmp_path):
    cmd = [NVCC, "-arch=sm_90", "--ptx", "-Xcicc", "-O0", "-DSA_HEAD_DIM=72", str(CSRC / "sparse_attention.cu"),
           "-o", str(tmp_path / "x.ptx")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode != 0 and "multiple of 16" in done.stderr
