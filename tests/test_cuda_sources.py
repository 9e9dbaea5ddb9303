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

from sparse_attn.backends.cuda.launcher import kernel_specialisations
from sparse_attn.backends.jit import define_options

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


# ---------------------------------------------------------------------------------------------------- NVRTC
def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:                     # CuPy or libnvrtc absent
        return None


needs_nvrtc = pytest.mark.skipif(_nvrtc() is None, reason="CuPy's NVRTC is not loadable (install cupy-cuda12x "
                                                           "and nvidia-cuda-nvrtc-cu12): NVRTC compile check skipped")


@needs_nvrtc
def test_every_specialisation_compiles_with_nvrtc():
    """What the loader runs on a GPU machine: NVRTC, no headers (-G: unoptimised PTX, fast; same front end)."""
    nvrtc = _nvrtc()
    failed = []
    for name, specs in kernel_specialisations().items():
        source = (CSRC / name).read_text()
        for defines in specs:
            program = nvrtc.createProgram(source, name, (), ())
            try:
                nvrtc.compileProgram(program, (*define_options(defines), "-arch=compute_90", "-G"))
                ptx = nvrtc.getPTX(program)
                ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
                assert f".entry {KERNELS[name]}(" in ptx
            except nvrtc.NVRTCError:
                failed.append(f"{name} {defines}: {nvrtc.getProgramLog(program)[-400:]}")
            finally:
                nvrtc.destroyProgram(program)
    assert not failed, "\n".join(failed)


@needs_nvrtc
def test_loader_compiles_a_cubin_through_its_cache(tmp_path):
    from sparse_attn.backends.cuda.launcher import nvrtc_compile
    from sparse_attn.backends.jit import KernelCache

    cache = KernelCache(nvrtc_compile, lambda path: Path(path).read_bytes(), directory=tmp_path)
    source = (CSRC / "vertical_slash_index.cu").read_text()
    binary = cache.load("vertical_slash_index.cu", source, {}, "90")
    assert binary.startswith(b"\x7fELF")                               # a cubin for sm_90
    ptx = nvrtc_compile(source, (), "999")                              # an arch NVRTC does not know: PTX
    assert b".entry vertical_slash_to_layout(" in ptx
    with pytest.raises(RuntimeError, match="NVRTC could not compile"):
        nvrtc_compile("extern \"C\" __global__ void f() { undefined_call(); }", (), "90")
