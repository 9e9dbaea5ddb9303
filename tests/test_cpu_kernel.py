"""The compiled CPU kernel's own concerns: how it is chosen, built and identified, and what the oracle tests of
`test_torch_backend.py` (which run every case, random layouts with shuffled tiles included, on it too) do not
reach: extreme scores, thread counts, hand-built layouts at every causal boundary (touching, clipped and unsorted
tiles, diagonal columns), every key listed, block sizes far above the lengths, low precision rounded once."""
import random
from pathlib import Path

import pytest
import torch

import sparse_attn as sa
from sparse_attn import prefill
from sparse_attn.backends.cpu import loader as cpu_kernel
from sparse_attn.backends import select_backend
from helpers import assert_close, assert_lse_close, make_qkv, plain_attention

@pytest.fixture
def compiled_kernel():
    """Skips at run time, not at collection: deciding at collection would build the kernel just to list the tests."""
    if not cpu_kernel.available():
        pytest.skip("the compiled CPU kernel cannot be built here")


needs_kernel = pytest.mark.usefixtures("compiled_kernel")


def oracle(q, k, v, layout, causal, scale=None):
    return sa.reference_attention(q, k, v, layout.to_mask(), causal=causal, return_lse=True, scale=scale)


def test_auto_picks_the_kernel_on_cpu_float_inputs_and_torch_for_fp64(monkeypatch):
    q32 = torch.zeros(1, 2, 8, 16)
    monkeypatch.setattr(cpu_kernel, "available", lambda: True)
    assert select_backend("auto", q32, q32, q32).name == "cpu"
    assert select_backend("auto", q32.half(), q32.half(), q32.half()).name == "cpu"
    assert select_backend("auto", q32.double(), q32.double(), q32.double()).name == "torch"
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    assert select_backend("auto", q32, q32, q32).name == "torch"


def test_explicit_cpu_backend_refuses_fp64_naming_the_backend():
    q, k, v = make_qkv(1, 2, 1, 70, 70, 16, seed=0, dtype=torch.float64)
    layout = sa.estimate(q, k, sa.AShape(sink=16, local=32))
    with pytest.raises(ValueError, match="backend='cpu'.*float64"):
        sa.sparse_attention(q, k, v, layout, backend="cpu")


def test_turned_off_kernel_falls_back_to_torch_and_explicit_request_says_why(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_CPU_KERNEL", "0")
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is None and not cpu_kernel.available()
        q, k, v = make_qkv(1, 2, 1, 100, 100, 16, seed=1)
        layout = sa.estimate(q, k, sa.AShape(sink=16, local=32))
        out = sa.sparse_attention(q, k, v, layout)                 # auto: the torch backend
        assert_close(out, oracle(q, k, v, layout, True)[0], atol=1e-5)
        with pytest.raises(ValueError, match="backend='cpu'.*unavailable"):
            sa.sparse_attention(q, k, v, layout, backend="cpu")
    finally:
        monkeypatch.delenv("SPARSE_ATTN_CPU_KERNEL")
        cpu_kernel.load.cache_clear()


def test_failed_build_warns_once_and_auto_takes_the_torch_backend(monkeypatch, tmp_path):
    """No compiler (or a broken one): the build raises inside torch's cpp_extension; the package must warn, say
    why, and keep working on the torch backend."""
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
    cpu_kernel.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled CPU kernel is unavailable.*command not found"):
            assert not cpu_kernel.available()
        q, k, v = make_qkv(1, 2, 1, 100, 100, 16, seed=2)
        assert select_backend("auto", q, k, v).name == "torch"
        layout = sa.estimate(q, k, sa.AShape(sink=16, local=32))
        assert_close(sa.sparse_attention(q, k, v, layout), oracle(q, k, v, layout, True)[0], atol=1e-5)
    finally:
        cpu_kernel.load.cache_clear()


def test_damaged_cached_library_is_rebuilt_never_loaded(monkeypatch, tmp_path):
    """A cached library cut short (an interrupted build, a full disk) must not be mapped (that is a bus error):
    its sha256 no longer matches the one recorded at build time, so it is rebuilt, with a warning.  The compiler
    and the loader are stand-ins here; a real truncated build was checked by hand (see the branch's report)."""
    import torch.utils.cpp_extension as cpp_extension

    builds, loaded = [], []

    def fake_build(name, build_directory, **kwargs):
        builds.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"\x7fELF" + bytes(range(256)) * 64)

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
    cpu_kernel.load.cache_clear()
    try:
        assert cpu_kernel.load() is not None and len(builds) == 1 and not loaded     # built (and loaded by build)
        library = next(tmp_path.glob("cpu/*/*.so"))
        assert cpu_kernel.verified(library)
        cpu_kernel.load.cache_clear()
        assert cpu_kernel.load() is not None and len(builds) == 1 and loaded == [str(library)]   # verified reuse
        with open(library, "r+b") as f:
            f.truncate(1000)
        cpu_kernel.load.cache_clear()
        with pytest.warns(RuntimeWarning, match="does not match its recorded checksum"):
            assert cpu_kernel.load() is not None
        assert len(builds) == 2 and loaded == [str(library)] and cpu_kernel.verified(library)
        cpu_kernel.checksum_path(library).unlink()                                  # a build cut before the record
        cpu_kernel.load.cache_clear()
        with pytest.warns(RuntimeWarning, match="does not match"):
            cpu_kernel.load()
        assert len(builds) == 3 and loaded == [str(library)]
    finally:
        cpu_kernel.load.cache_clear()


def test_build_name_changes_with_source_flags_torch_and_cpu():
    base = cpu_kernel.build_name(b"source", cpu="flags: avx2")
    assert base == cpu_kernel.build_name(b"source", cpu="flags: avx2")
    assert base != cpu_kernel.build_name(b"source2", cpu="flags: avx2")
    assert base != cpu_kernel.build_name(b"source", flags=("-O2",), cpu="flags: avx2")
    assert base != cpu_kernel.build_name(b"source", torch_version="0.0", cpu="flags: avx2")
    assert base != cpu_kernel.build_name(b"source", cpu="flags: avx2 avx512f")


def test_source_ships_where_the_loader_looks():
    assert cpu_kernel.source_path().read_text().count("TORCH_LIBRARY(sparse_attn_cpu") == 1


@needs_kernel
def test_extreme_scores_stay_finite_and_match_the_oracle():
    """Scores far outside [-87, 87] (the exp's clamped range) before the max is taken off."""
    q, k, v = make_qkv(1, 2, 1, 200, 200, 64, seed=4)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=16, slash=64, sink=4, local=64))
    for scale in (4.0, 1e-4):
        out, lse = sa.sparse_attention(q, k, v, layout, scale=scale, backend="cpu", return_lse=True)
        ref, ref_lse = oracle(q, k, v, layout, True, scale=scale)
        assert torch.isfinite(out).all()
        assert_close(out, ref, atol=1e-4)
        assert_lse_close(lse, ref_lse, atol=1e-4 * max(1.0, float(ref_lse.abs().max())))


@needs_kernel
def test_thread_count_does_not_change_the_result():
    q, k, v = make_qkv(2, 4, 2, 700, 700, 64, seed=5)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=32, slash=128, sink=4, local=64))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sa.sparse_attention(q, k, v, layout, backend="cpu")
        torch.set_num_threads(2)
        two = sa.sparse_attention(q, k, v, layout, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# ---------------------------------------------------------------------------------------------------- edge layouts
def oracle_mask(layout):
    """`SparseLayout.to_mask` without its [B, H, nQb * block_m, Lk] intermediate (block_m may exceed Lq hugely)."""
    return layout.block_key_mask().repeat_interleave(min(layout.block_m, layout.q_len), dim=2)[:, :, :layout.q_len]


def check_kernel(q, k, v, layout, causal, scale=None):
    out, lse = sa.sparse_attention(q, k, v, layout, causal=causal, scale=scale, backend="cpu", return_lse=True)
    ref, ref_lse = sa.reference_attention(q, k, v, oracle_mask(layout), causal=causal, scale=scale, return_lse=True)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, ref, atol=1e-5)
    assert_lse_close(lse, ref_lse, atol=1e-5)
    return out, lse


def boundary_layout(B, H, lq, lk, block_m, block_n, seed):
    """Per query block, alternately: tiles ending exactly at, one past and one before the block's last visible
    key and one starting right after its first row's key, or tiles ending right before the first row's key (the
    diagonal keys then left to columns); each with a touching neighbour (one run), plus a tile wholly after the
    last visible key, one clipped at Lk, one at 0; columns on every row's diagonal key not in a tile, one key
    before and two after the block, Lk - 1.  Listed shuffled, shifted and thinned per (b, h) so batch rows and
    heads differ."""
    rng = random.Random(seed)
    n_qb = -(-lq // block_m)
    tiles, cols = [], []
    for b in range(B):
        for h in range(H):
            for m in range(n_qb):
                first = m * block_m + lk - lq
                last = min(lq, (m + 1) * block_m) - 1 + lk - lq
                shift = (b * H + h) % 3
                if (m + b + h) % 2:      # the rows' diagonal keys in tiles crossing it
                    wanted = [last - block_n + 1 - shift, last - block_n + 2, last - block_n, first + 1 + shift]
                else:                    # the diagonal keys left to the columns, tiles just before the block
                    wanted = [first - block_n - shift, first - block_n + 1]
                wanted += [w - block_n for w in wanted] + [last + 1, lk - block_n // 2, 0]   # touching: one run
                chosen, covered = [], set()
                for s in wanted:
                    keys = set(range(s, min(s + block_n, lk)))
                    if 0 <= s < lk and not keys & covered:
                        chosen.append(s)
                        covered |= keys
                c = [key for key in [*range(first, last + 1), first - 1, last + 1, last + 2, lk - 1]
                     if 0 <= key < lk and key not in covered and (key + b + h) % 4 != 3]
                c = sorted(set(c))
                rng.shuffle(chosen)
                rng.shuffle(c)
                tiles.append(chosen)
                cols.append(c)

    def pack(rows):
        width = max(len(r) for r in rows) + 1
        data = torch.full((len(rows), width), -5, dtype=torch.int32)             # junk padding
        for i, r in enumerate(rows):
            data[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
        count = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        return count.reshape(B, H, n_qb), data.reshape(B, H, n_qb, width)

    (bc, bo), (cc, ci) = pack(tiles), pack(cols)
    return sa.SparseLayout(bc, bo, cc, ci, q_len=lq, k_len=lk, block_m=block_m, block_n=block_n).check()


BOUNDARY_CASES = [  # (lq, lk, block_m, block_n)
    (100, 100, 64, 64), (100, 230, 16, 32), (77, 301, 32, 16), (130, 200, 128, 48), (1, 90, 64, 64),
    (1, 1, 16, 16), (65, 65, 48, 80), (50, 190, 8, 128)]


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,block_m,block_n", BOUNDARY_CASES)
def test_tiles_and_columns_at_every_causal_boundary_match_the_oracle(lq, lk, block_m, block_n, causal):
    q, k, v = make_qkv(2, 4, 2, lq, lk, 16, seed=lq + lk)
    layout = boundary_layout(2, 4, lq, lk, block_m, block_n, seed=block_m + block_n)
    check_kernel(q, k, v, layout, causal)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
def test_hundreds_of_columns_and_blocks_listing_every_key(causal):
    """Columns only (every key of the sequence, or every other one), and single-key tiles over every key: the
    score buffer is block_m x Lk wide; MQA with different rows per batch row."""
    lq, lk, n_qb = 70, 333, 3
    q, k, v = make_qkv(2, 3, 1, lq, lk, 16, seed=9, contiguity="blhd")
    every = torch.arange(lk, dtype=torch.int32).flip(0)
    cc = torch.full((2, 3, 2), lk, dtype=torch.int32)
    ci = every.expand(2, 3, 2, lk).clone()
    ci[1, 2, 1, :lk // 2 + 1] = torch.arange(0, lk, 2, dtype=torch.int32)
    cc[1, 2, 1] = lk // 2 + 1
    zero = torch.zeros(2, 3, 2, dtype=torch.int32)
    check_kernel(q, k, v, sa.SparseLayout(zero, zero[..., None], cc, ci, q_len=lq, k_len=lk).check(), causal)
    single = sa.SparseLayout(cc.clone()[..., :1].expand(2, 3, n_qb).contiguous(), every.expand(2, 3, n_qb, lk).clone(),
                             torch.zeros(2, 3, n_qb, dtype=torch.int32), torch.zeros(2, 3, n_qb, 0, dtype=torch.int32),
                             q_len=lq, k_len=lk, block_m=32, block_n=1).check()
    check_kernel(q, k, v, single, causal)


@needs_kernel
@pytest.mark.parametrize("segment", [1, 7, 64, 130])
def test_blocks_seeing_more_keys_than_a_segment_match_the_oracle(monkeypatch, segment):
    """Blocks whose keys exceed `loader.SEGMENT_KEYS` take them in segments with an online softmax: runs split
    inside and across tiles, columns in the last segment or one of their own, rows that see no key in the first
    segments; dense, hand-built and column-only layouts, fp32 and the native low-precision route."""
    monkeypatch.setattr(cpu_kernel, "SEGMENT_KEYS", segment)
    q, k, v = make_qkv(2, 4, 2, 150, 333, 16, seed=segment)
    for causal in (True, False):
        check_kernel(q, k, v, sa.estimate(q, k, sa.Dense(), causal=causal), causal)
        check_kernel(q, k, v, boundary_layout(2, 4, 150, 333, 32, 16, seed=segment), causal)
        check_kernel(q, k, v, sa.estimate(q, k, sa.VerticalSlash(vertical=40, slash=96, sink=4, local=32),
                                          causal=causal), causal)
    lq, lk = 70, 333
    every = torch.arange(lk, dtype=torch.int32).flip(0).expand(2, 4, 2, lk).contiguous()
    zero = torch.zeros(2, 4, 2, dtype=torch.int32)
    columns = sa.SparseLayout(zero, zero[..., None], torch.full_like(zero, lk), every, q_len=lq, k_len=lk).check()
    check_kernel(q[:, :, :lq], k, v, columns, causal=True)
    for dtype in (torch.bfloat16, torch.float16):
        if not cpu_kernel.native_low_precision(dtype, 16):
            continue
        ql, kl, vl = (t.to(dtype) for t in (q, k, v))
        layout = boundary_layout(2, 4, 150, 333, 32, 16, seed=1)
        out, lse = sa.sparse_attention(ql, kl, vl, layout, backend="cpu", return_lse=True)
        ref, ref_lse = sa.reference_attention(ql.float(), kl.float(), vl.float(), oracle_mask(layout),
                                              return_lse=True)
        assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        assert_lse_close(lse, ref_lse, atol=2e-2)


@needs_kernel
@pytest.mark.parametrize("block_m,block_n", [(2 ** 40, 64), (64, 2 ** 40)])
def test_block_sizes_far_above_the_lengths_do_not_size_the_buffers(block_m, block_n):
    """The per-thread buffers must follow Lq and Lk, not block_m and block_n (which are only bounded below)."""
    lq, lk = 100, 150
    q, k, v = make_qkv(2, 2, 1, lq, lk, 16, seed=2)
    n_qb = -(-lq // block_m)
    bc = torch.ones(2, 2, n_qb, dtype=torch.int32)
    bo = torch.tensor([40, 7], dtype=torch.int32)[:n_qb].expand(2, 2, n_qb)[..., None].contiguous()
    bo[1, 1] = 5
    cc = torch.ones(2, 2, n_qb, dtype=torch.int32)
    ci = torch.full((2, 2, n_qb, 1), 3, dtype=torch.int32)
    layout = sa.SparseLayout(bc, bo, cc, ci, q_len=lq, k_len=lk, block_m=block_m, block_n=block_n).check()
    for causal in (True, False):
        check_kernel(q, k, v, layout, causal)


@needs_kernel
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2 ** -10), (torch.bfloat16, 2 ** -7)])
def test_low_precision_on_the_fp32_route_is_rounded_once(dtype, rtol, monkeypatch):
    """Where the CPU has no low-precision GEMM (or it is turned off) the kernel upcasts: its output is the fp32
    oracle's on the same (low-precision) values, rounded once to q's dtype, and its LSE is the fp32 oracle's."""
    monkeypatch.setenv("SPARSE_ATTN_CPU_LOW_PRECISION", "0")
    assert not cpu_kernel.native_low_precision(dtype, 32)
    q, k, v = make_qkv(2, 4, 2, 90, 200, 32, seed=6, dtype=dtype, contiguity="strided")
    layout = boundary_layout(2, 4, 90, 200, 32, 32, seed=1)
    out, lse = sa.sparse_attention(q, k, v, layout, backend="cpu", return_lse=True)
    ref, ref_lse = sa.reference_attention(q.float(), k.float(), v.float(), layout.to_mask(), return_lse=True)
    assert out.dtype == dtype
    assert_close(out.float(), ref, atol=1e-5, rtol=rtol)
    assert_lse_close(lse, ref_lse, atol=1e-5)


@pytest.fixture
def native_gemm(dtype):
    if not (cpu_kernel.available() and cpu_kernel.native_low_precision(dtype, 64)):
        pytest.skip(f"this CPU has no {dtype} batch-reduce GEMM")


def native(test):
    return pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])(
        pytest.mark.usefixtures("native_gemm")(test))


@native
@pytest.mark.parametrize("lq,lk,causal", [(113, 113, True), (65, 301, True), (100, 230, False)])
def test_native_low_precision_within_twice_plain_torch_error(dtype, lq, lk, causal):
    """bf16/fp16 on the low-precision GEMMs (odd key lengths and unaligned slash tiles exercise the key-pair
    padding): error against the fp32 oracle at most twice that of plain torch attention in the same dtype."""
    q, k, v = make_qkv(2, 4, 2, lq, lk, 64, seed=lq + lk, dtype=dtype, contiguity="strided", structured=True)
    layout = sa.estimate(q.float(), k.float(), sa.VerticalSlash(vertical=24, slash=48, sink=4, local=32),
                         causal=causal)
    listed = torch.arange(layout.block_offset.shape[-1]) < layout.block_count[..., None]
    assert bool(((layout.block_offset % 2 == 1) & listed).any())        # some run starts mid-pair
    mask = layout.to_mask()
    out, lse = sa.sparse_attention(q, k, v, layout, causal=causal, backend="cpu", return_lse=True)
    ref, ref_lse = sa.reference_attention(q.float(), k.float(), v.float(), mask, causal=causal, return_lse=True)
    plain = plain_attention(q, k, v, mask, causal=causal)
    assert out.dtype == dtype
    kernel_err = (out.float() - ref).abs().max().item()
    plain_err = (plain.float() - ref).abs().max().item()
    assert kernel_err <= 2 * plain_err + 1e-5, (kernel_err, plain_err)
    assert_lse_close(lse, ref_lse, atol=2e-2)


@native
def test_native_low_precision_at_every_causal_boundary(dtype):
    """Hand-built tiles and columns at every boundary (rows that see no key included) on the native route."""
    q, k, v = make_qkv(2, 4, 2, 77, 301, 16, seed=3, dtype=dtype)
    layout = boundary_layout(2, 4, 77, 301, 32, 16, seed=5)
    for causal in (True, False):
        out, lse = sa.sparse_attention(q, k, v, layout, causal=causal, backend="cpu", return_lse=True)
        ref, ref_lse = sa.reference_attention(q.float(), k.float(), v.float(), oracle_mask(layout), causal=causal,
                                              return_lse=True)
        assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        assert_lse_close(lse, ref_lse, atol=2e-2)


# ---------------------------------------------------------------------------------------------------- softcap
def capped_oracle(q, k, v, mask, causal, scale, softcap):
    """Dense fp64 attention with the scores capped (``softcap * tanh(s / softcap)``) before mask and softmax."""
    Hq, Hkv, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    kk = k.double().repeat_interleave(Hq // Hkv, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    s = softcap * torch.tanh(s / softcap)
    allowed = mask & (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + Lk - Lq) if causal else mask
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return (p @ v.double().repeat_interleave(Hq // Hkv, 1)).float(), lse.float()


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
def test_softcap_matches_a_capped_oracle(softcap, causal):
    q, k, v = make_qkv(2, 4, 2, 90, 200, 32, seed=8, contiguity="blhd")
    q = q * 3.0                                          # scores well past the small caps
    layout = boundary_layout(2, 4, 90, 200, 32, 32, seed=2)
    out, lse = cpu_kernel.cpu_kernel_attention(q, k, v, layout, causal=causal, scale=0.3, return_lse=True,
                                               softcap=softcap)
    ref, ref_lse = capped_oracle(q, k, v, oracle_mask(layout), causal, 0.3, softcap)
    assert_close(out, ref, atol=2e-5)
    assert_lse_close(lse, ref_lse, atol=2e-5)
    uncapped = cpu_kernel.cpu_kernel_attention(q, k, v, layout, causal=causal, scale=0.3)
    assert (uncapped - out).abs().max() > 1e-2           # the cap changed the result


@needs_kernel
def test_softcap_zero_is_off_and_bad_values_are_refused_naming_it():
    q, k, v = make_qkv(1, 2, 1, 70, 70, 16, seed=0)
    layout = sa.estimate(q, k, sa.AShape(sink=16, local=32))
    plain = cpu_kernel.cpu_kernel_attention(q, k, v, layout, causal=True, scale=0.25)
    assert torch.equal(cpu_kernel.cpu_kernel_attention(q, k, v, layout, causal=True, scale=0.25, softcap=0.0), plain)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softcap"):
            cpu_kernel.cpu_kernel_attention(q, k, v, layout, causal=True, scale=0.25, softcap=bad)


@native
def test_softcap_on_the_native_low_precision_route(dtype):
    q, k, v = make_qkv(2, 4, 2, 65, 129, 32, seed=12, dtype=dtype)
    layout = boundary_layout(2, 4, 65, 129, 32, 32, seed=4)
    out = cpu_kernel.cpu_kernel_attention(q, k, v, layout, causal=True, scale=1.0, softcap=2.0)
    ref, _ = capped_oracle(q.float(), k.float(), v.float(), oracle_mask(layout), True, 1.0, 2.0)
    assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------------- bounds
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_of_range_indices_are_bounded_not_read(dtype):
    """With check_layout=False a bad layout must not crash or exhaust memory: the kernel clamps counts to the index
    width and reads only keys in [0, Lk), so it equals the oracle on the valid layout those rules leave."""
    lq = lk = 150
    q, k, v = make_qkv(2, 2, 1, lq, lk, 16, seed=7, dtype=dtype)
    n_qb = 3                                              # block_m 64
    bo = torch.tensor([[-40, 70], [2 ** 30, -2 ** 31], [100, lk]], dtype=torch.int32).expand(2, 2, n_qb, 2).clone()
    bc = torch.tensor([2, 2 ** 31 - 1, 2], dtype=torch.int32).expand(2, 2, n_qb).clone()   # past the width: 2
    ci = torch.tensor([[-7, 30, 2 ** 31 - 1, 41], [9, lk, -1, 12], [3, 4, 5, 6]], dtype=torch.int32)
    ci = ci.expand(2, 2, n_qb, 4).clone()
    cc = torch.tensor([4, 2 ** 20, -3], dtype=torch.int32).expand(2, 2, n_qb).clone()   # 4, past the width: 4, 0
    bad = sa.SparseLayout(bc, bo, cc, ci, q_len=lq, k_len=lk)
    with pytest.raises(ValueError):
        bad.check_indices()
    # what the bounds leave: tile [-40, 24) -> keys 0..23 as columns, [70, 134); nothing in block 1's tiles;
    # [100, 164) -> keys 100..149; columns 30, 41 | 9, 12 | none
    keep = torch.zeros(2, 2, n_qb, lk, dtype=torch.bool)
    keep[:, :, 0, :24] = keep[:, :, 0, 70:134] = keep[:, :, 2, 100:] = True
    keep[:, :, 0, [30, 41]] = keep[:, :, 1, [9, 12]] = True
    mask = keep.repeat_interleave(64, dim=2)[:, :, :lq]
    for causal in (True, False):
        out, lse = sa.sparse_attention(q, k, v, bad, causal=causal, backend="cpu", check_layout=False,
                                       return_lse=True)
        ref, ref_lse = sa.reference_attention(q.float(), k.float(), v.float(), mask, causal=causal, return_lse=True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close(out.float(), ref, atol=tol, rtol=tol)
        assert_lse_close(lse, ref_lse, atol=tol)


def test_zero_head_dim_is_refused_naming_it():
    q = torch.zeros(1, 1, 5, 0)
    zero = torch.zeros(1, 1, 1, dtype=torch.int32)
    layout = sa.SparseLayout(zero + 1, zero[..., None], zero, zero[..., :0, None].reshape(1, 1, 1, 0), q_len=5,
                             k_len=5)
    for backend in ("cpu", "torch"):
        with pytest.raises(ValueError, match="head_dim"):
            sa.sparse_attention(q, q, q, layout, scale=1.0, backend=backend)
