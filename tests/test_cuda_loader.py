"""The CUDA backend's loader without a GPU: cache keys, memo / disk hits, the file lock against concurrent builders,
launch arguments against the kernels' parameter lists, and the errors when CuPy, a GPU or CUDA tensors are missing."""
import multiprocessing
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import sparse_attn as sa
from sparse_attn.backends.cuda import launcher as cuda
from sparse_attn.backends.jit import KernelCache, cache_key

from cuda_helpers import CSRC, kernel_parameters


class FakeCompiler:
    """Counts compiles; the 'binary' names the source and options so a wrong artifact would show."""

    def __init__(self, delay=0.0):
        self.calls, self.delay = [], delay

    def __call__(self, source, options, arch):
        self.calls.append((options, arch))
        time.sleep(self.delay)
        return f"BIN[{arch}|{' '.join(options)}|{len(source)}]".encode()


def read_bytes(path):
    return Path(path).read_bytes()


# ---------------------------------------------------------------------------------------------------- cache
def test_cache_key_changes_with_every_input():
    base = ("k.cu", "src", {"A": 1, "B": 2}, "90", "cupy-14")
    key = cache_key(*base)
    assert key == cache_key("k.cu", "src", {"B": 2, "A": 1}, "90", "cupy-14")          # define order is irrelevant
    variants = [("x.cu", "src", {"A": 1, "B": 2}, "90", "cupy-14"), ("k.cu", "src ", {"A": 1, "B": 2}, "90", "cupy-14"),
                ("k.cu", "src", {"A": 1, "B": 3}, "90", "cupy-14"), ("k.cu", "src", {"A": 1}, "90", "cupy-14"),
                ("k.cu", "src", {"A": 1, "B": 2}, "80", "cupy-14"), ("k.cu", "src", {"A": 1, "B": 2}, "90", "cupy-13")]
    keys = {cache_key(*v) for v in variants}
    assert key not in keys and len(keys) == len(variants)


def test_second_load_hits_memo_then_disk(tmp_path):
    compiler, loads = FakeCompiler(), []
    cache = KernelCache(compiler, lambda p: loads.append(p) or read_bytes(p), directory=tmp_path, toolchain="t1")
    first = cache.load("attn.cu", "source", {"SA_DTYPE": 1, "SA_HEAD_DIM": 128}, "90")
    again = cache.load("attn.cu", "source", {"SA_HEAD_DIM": 128, "SA_DTYPE": 1}, "90")
    assert len(compiler.calls) == 1 and len(loads) == 1 and first == again
    assert compiler.calls[0] == (("-DSA_DTYPE=1", "-DSA_HEAD_DIM=128"), "90")
    artifact = cache.artifact_path("attn.cu", "source", {"SA_DTYPE": 1, "SA_HEAD_DIM": 128}, "90")
    assert artifact.parent == tmp_path and artifact.read_bytes() == first
    # a new process (fresh cache object) loads the artifact from disk without compiling
    fresh_compiler = FakeCompiler()
    fresh = KernelCache(fresh_compiler, read_bytes, directory=tmp_path, toolchain="t1")
    assert fresh.load("attn.cu", "source", {"SA_DTYPE": 1, "SA_HEAD_DIM": 128}, "90") == first
    assert fresh_compiler.calls == []
    # another specialisation, arch, source or toolchain compiles anew into its own file
    fresh.load("attn.cu", "source", {"SA_DTYPE": 0, "SA_HEAD_DIM": 128}, "90")
    fresh.load("attn.cu", "source", {"SA_DTYPE": 1, "SA_HEAD_DIM": 128}, "80")
    fresh.load("attn.cu", "source v2", {"SA_DTYPE": 1, "SA_HEAD_DIM": 128}, "90")
    KernelCache(fresh_compiler, read_bytes, directory=tmp_path, toolchain="t2").load(
        "attn.cu", "source", {"SA_DTYPE": 1, "SA_HEAD_DIM": 128}, "90")
    assert len(fresh_compiler.calls) == 4 and len(list(tmp_path.glob("attn-*.bin"))) == 5
    # a module is loaded once per device
    fresh.load("attn.cu", "source", {"SA_DTYPE": 1, "SA_HEAD_DIM": 128}, "90", device=1)
    assert len(fresh_compiler.calls) == 4


def test_cache_directory_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path / "from_env"))
    cache = KernelCache(FakeCompiler(), read_bytes)
    cache.load("k.cu", "src", {}, "90")
    assert len(list((tmp_path / "from_env").glob("k-*.bin"))) == 1


def test_empty_artifact_is_rebuilt_and_failed_compile_leaves_nothing(tmp_path):
    compiler = FakeCompiler()
    cache = KernelCache(compiler, read_bytes, directory=tmp_path)
    path = cache.artifact_path("k.cu", "src", {}, "90")
    path.write_bytes(b"")                                    # e.g. a crash of an old version mid-write
    assert cache.load("k.cu", "src", {}, "90").startswith(b"BIN[")
    assert len(compiler.calls) == 1

    def broken(source, options, arch):
        raise RuntimeError("nvrtc: error: expected a ';'")

    cache = KernelCache(broken, read_bytes, directory=tmp_path)
    with pytest.raises(RuntimeError, match="expected a ';'"):
        cache.load("k.cu", "other", {}, "90")
    assert not cache.artifact_path("k.cu", "other", {}, "90").exists()
    assert not list(tmp_path.glob("*.tmp"))
    ok = KernelCache(compiler, read_bytes, directory=tmp_path)      # the lock was released
    assert ok.load("k.cu", "other", {}, "90").startswith(b"BIN[")


def test_compiler_returning_nothing_is_an_error(tmp_path):
    cache = KernelCache(lambda s, o, a: b"", read_bytes, directory=tmp_path)
    with pytest.raises(RuntimeError, match="no binary"):
        cache.load("k.cu", "src", {}, "90")


def _build_in_process(directory, counter, barrier, result):
    def compile_and_count(source, options, arch):
        with open(counter, "a") as f:
            f.write("compile\n")
        time.sleep(0.5)                                      # slow: the other builder arrives meanwhile
        return b"artifact"

    barrier.wait()
    module = KernelCache(compile_and_count, read_bytes, directory=directory).load("k.cu", "src", {"X": 1}, "90")
    with open(result, "ab") as f:
        f.write(module + b"\n")


def test_file_lock_serialises_concurrent_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    counter, result = tmp_path / "compiles.txt", tmp_path / "results.txt"
    procs = [ctx.Process(target=_build_in_process, args=(tmp_path / "cache", counter, barrier, result))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text().splitlines() == ["compile"]             # exactly one build
    assert result.read_bytes().splitlines() == [b"artifact"] * 3         # everyone loaded it


def test_file_lock_serialises_threads_with_separate_caches(tmp_path):
    compiler = FakeCompiler(delay=0.3)
    start = threading.Barrier(4)
    results = []

    def worker():
        start.wait()
        results.append(KernelCache(compiler, read_bytes, directory=tmp_path).load("k.cu", "src", {}, "90"))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(compiler.calls) == 1 and len(results) == 4 and len(set(results)) == 1


# ---------------------------------------------------------------------------------------------------- errors
def small_inputs(dtype=torch.float16, D=64):
    q, k, v = (torch.randn(1, 2, 65, D).to(dtype) for _ in range(3))
    layout = sa.estimate(q.float(), k.float(), sa.AShape(sink=8, local=16))
    return q, k, v, layout


def test_missing_cupy_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)                    # makes `import cupy` raise ImportError
    reasons = cuda.cuda_unavailable_reasons()
    assert any("CuPy is not installed" in r for r in reasons)
    q, k, v, layout = small_inputs()
    with pytest.raises(cuda.CudaBackendError, match="CuPy is not installed"):
        cuda.cuda_sparse_attention(q, k, v, layout)


def test_every_reason_in_one_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    q, k, v, layout = small_inputs(torch.float64, D=48)
    with pytest.raises(cuda.CudaBackendError) as err:
        cuda.cuda_sparse_attention(q, k, v, layout)
    msg = str(err.value)
    for part in ("CuPy is not installed", "no CUDA GPU", "q is on cpu", "k is on cpu", "v is on cpu",
                 "float64 is not supported", "head_dim 48 is not supported"):
        assert part in msg, part


def test_no_gpu_and_cpu_tensors_with_cupy_present(monkeypatch):
    monkeypatch.setattr(cuda, "_import_cupy", lambda: object())          # CuPy importable
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    q, k, v, layout = small_inputs(torch.bfloat16)
    with pytest.raises(cuda.CudaBackendError) as err:
        sa.sparse_attention(q, k, v, layout, backend="cuda")
    msg = str(err.value)
    assert "no CUDA GPU" in msg and "q is on cpu" in msg and "CuPy" not in msg
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)


def test_cpu_tensors_alone_are_reported(monkeypatch):
    monkeypatch.setattr(cuda, "_import_cupy", lambda: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)        # as on a GPU machine
    q, k, v, layout = small_inputs()
    with pytest.raises(cuda.CudaBackendError) as err:
        cuda.cuda_sparse_attention(q, k, v, layout)
    assert str(err.value).count("is on cpu") == 4                       # q, k, v and the layout
    vert, slash = torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, dtype=torch.int32)
    lens = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(cuda.CudaBackendError, match="vertical_indexes is on cpu"):
        cuda.cuda_convert_vertical_slash_indexes(lens, lens, vert, slash, 10, 64, 64)


def test_index_launcher_checks_arguments_first():
    with pytest.raises(ValueError, match="block_size_N"):
        cuda.cuda_convert_vertical_slash_indexes(torch.tensor([10], dtype=torch.int32),
                                                 torch.tensor([10], dtype=torch.int32),
                                                 torch.zeros(1, 1, 2, dtype=torch.int32),
                                                 torch.zeros(1, 1, 2, dtype=torch.int32), 10, 64, 0)


def test_import_does_not_load_cupy_or_cuda():
    code = ("import sys, sparse_attn, sparse_attn.backends.cuda.launcher, sparse_attn.integrations; "
            "bad = [m for m in ('cupy', 'cupy_backends', 'triton') if m in sys.modules]; "
            "assert not bad, bad; import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------------------------------------- launch args
def test_attention_launch_args_match_kernel_signature():
    q = torch.randn(2, 4, 4, 160).to(torch.float16)[..., ::2]                                # stride 2 in D
    k = torch.randn(2, 2, 9, 80).to(torch.float16)
    v = torch.randn(2, 9, 2, 80).to(torch.float16).transpose(1, 2)                           # BLHD view
    layout = sa.estimate(q.float(), k.float(), sa.AShape(sink=2, local=2), block_m=16, block_n=8)
    out, lse = torch.empty(2, 4, 4, 80, dtype=torch.float16), torch.empty(2, 4, 4)
    index = (layout.block_count, layout.block_offset, layout.column_count, layout.column_index)
    args = cuda.attention_launch_args(q, k, v, out, lse, index, layout, 0.125, True)
    params = kernel_parameters("sparse_attention.cu", "sparse_attention_fwd")
    assert [a.dtype.name for a in args] == [t for _, t in params]
    named = {name: a.item() for (name, _), a in zip(params, args)}
    assert named["q"] == q.data_ptr() and named["v"] == v.data_ptr() and named["lse"] == lse.data_ptr()
    assert [named[f"sv{d}"] for d in "bhld"] == list(v.stride())
    assert [named[f"sq{d}"] for d in "bhld"] == list(q.stride())
    assert (named["q_heads"], named["group_size"], named["q_len"], named["k_len"]) == (4, 2, 4, 9)
    assert (named["block_m"], named["block_n"], named["n_qb"]) == (16, 8, 1)
    assert named["max_blocks"] == layout.block_offset.shape[-1] and named["causal"] == 1
    assert named["scale_log2"] == pytest.approx(0.125 * 1.4426950408889634)
    no_lse = cuda.attention_launch_args(q, k, v, out, None, index, layout, 0.125, False)
    assert dict(zip([n for n, _ in params], no_lse))["write_lse"] == 0
    assert dict(zip([n for n, _ in params], no_lse))["lse"] == 0


def test_index_launch_args_match_kernel_signature():
    lens = torch.tensor([5, 7], dtype=torch.int32)
    vert, slash = torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 3, 2, dtype=torch.int64)
    outputs = tuple(torch.zeros(2, 3, 5, *extra, dtype=torch.int32) for extra in ((), (6,), (), (4,)))
    args = cuda.vertical_slash_launch_args(lens, lens, vert, slash, outputs, 5, 6, 64, 32, False)
    params = kernel_parameters("vertical_slash_index.cu", "vertical_slash_to_layout")
    assert [a.dtype.name for a in args] == [t for _, t in params]
    named = {name: a.item() for (name, _), a in zip(params, args)}
    assert named["column_index"] == outputs[3].data_ptr() and named["slash"] == slash.data_ptr()
    assert (named["heads"], named["n_rows"], named["nnz_v"], named["nnz_s"], named["max_tiles"]) == (3, 5, 4, 2, 6)
    assert (named["block_m"], named["block_n"], named["causal"]) == (64, 32, 0)


def test_launcher_constants_match_kernel_defines():
    text = (CSRC / "sparse_attention.cu").read_text()
    define = {m[0]: int(m[1]) for m in re.findall(r"#define (\w+) (\d+)\b", text)}
    assert (define["ROWS"], define["KEYS"], define["THREADS"]) == (cuda._ATT_ROWS, cuda._ATT_KEYS, cuda._ATT_THREADS)
    for d in cuda.ATTENTION_HEAD_DIMS:
        assert d % define["LANES"] == 0
        assert cuda.attention_shared_bytes(d) <= 227 * 1024                 # fits an H100 / A100 thread block
    assert "#define SA_DTYPE" in text and "#define SA_HEAD_DIM" in text


def test_specialisations_cover_dtypes_and_head_dims():
    specs = cuda.kernel_specialisations()
    assert set(specs) == {p.name for p in CSRC.glob("*.cu")}
    attention = specs["sparse_attention.cu"]
    assert len(attention) == len(cuda.ATTENTION_DTYPES) * len(cuda.ATTENTION_HEAD_DIMS) == 15
    assert cuda.source_dir() == CSRC
