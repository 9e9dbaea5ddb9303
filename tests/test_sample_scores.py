"""Sample scores of the vertical-slash estimators: the torch reference (`sample_mass.torch_sample_scores`) against an
fp64 dense softmax written out here, the fused C++ pass (`cpu_scores`) against the reference on awkward shapes,
their dispatch (`score_backends`), and identical layouts whichever implementation scores."""
import pytest
import torch

import sparse_attn as sa
from sparse_attn.backends.cpu import loader
from sparse_attn.errors import NotSupportedError
from sparse_attn.estimators import cpu_scores, score_backends
from sparse_attn.estimators.sample_mass import torch_sample_scores
from sparse_attn.tools.synthetic import HardWorkload, Workload, make_hard_qkv
from sparse_attn.tools.synthetic import make_qkv as make_workload
from helpers import causal_mask, make_qkv

# B, Hq, Hkv, Lq, Lk, D, last_q, causal, contiguity, heads, group: lengths off the 64 grid, Lq < Lk, a sample
# longer than Lq, MHA / GQA / MQA, head subsets out of order, non-contiguous inputs, samples spanning several groups.
CASES = {
    "L1": (1, 2, 2, 1, 1, 32, 64, True, "contiguous", [0, 1], 64),
    "q63_gqa": (2, 4, 2, 63, 63, 48, 64, True, "blhd", [0, 1, 2, 3], 16),
    "q65k113_mqa_subset": (2, 4, 1, 65, 113, 64, 64, True, "strided", [3, 0], 64),
    "q30k300_lastq_gt_lq": (2, 2, 1, 30, 300, 32, 64, True, "contiguous", [1, 0], 8),
    "q113_noncausal": (2, 3, 3, 113, 113, 16, 100, False, "contiguous", [2, 0, 1], 32),
    "q70k1000_gqa": (1, 8, 2, 70, 1000, 64, 64, True, "contiguous", [0, 3, 4, 7], 64),
    # long enough for the 16-key blocks of pass 2 with 64, 32, 48 and 128 sample rows and 2 to 5 diagonal groups
    "q96k700_group16": (2, 4, 2, 96, 700, 64, 64, True, "contiguous", [0, 1, 2, 3], 16),
    "q80k400_n32_noncausal": (1, 2, 1, 80, 400, 32, 32, False, "blhd", [1, 0], 64),
    "q48k500_n48_group128": (2, 2, 2, 48, 500, 32, 48, True, "contiguous", [0, 1], 128),
    "q160k900_n128": (1, 2, 1, 160, 900, 32, 128, True, "contiguous", [1, 0], 64),
}


def oracle(q, k, rows_n, scale, causal, heads, sink, local, group):
    """fp64 softmax of the last rows over all keys, reduced with explicit index arithmetic."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    n = min(rows_n, Lq)
    kk = k.double().repeat_interleave(Hq // Hkv, 1)[:, heads]
    logits = q.double()[:, heads, Lq - n:] @ kk.transpose(-1, -2) * scale
    if causal:
        logits = logits.masked_fill(~causal_mask(Lq, Lk)[Lq - n:], float("-inf"))
    p = torch.softmax(logits, -1)                                     # [B, Hs, n, Lk]
    pos = torch.arange(Lq - n, Lq) + Lk - Lq
    dist = pos[:, None] - torch.arange(Lk)                           # [n, Lk]
    column = p.sum(2)
    near = ((dist >= 0)[None] & (dist[None] < local[:, None, None])).double()
    off = column - (p * near).sum(2)
    diag = torch.zeros(B, len(heads), Lk, dtype=torch.float64)
    group_of = torch.div(dist, group, rounding_mode="floor")         # [n, Lk]
    by_group = {}
    for r in range(n):
        for j in range(Lk):
            d = int(dist[r, j])
            if d < 0:
                continue
            keep = (j >= sink).double()                                  # [Hs]
            diag[:, :, d] += p[:, :, r, j] * keep
            by_group.setdefault((j, int(group_of[r, j])), []).append(r)
    return column, off, diag, by_group, p, group_of, torch.logsumexp(logits, -1)


def inputs(name):
    B, Hq, Hkv, Lq, Lk, D, last_q, causal, contiguity, heads, group = CASES[name]
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=11, contiguity=contiguity, structured=True)
    heads = torch.tensor(heads)
    sink = torch.tensor([0, 5, 64, 2][:len(heads)] * 2)[:len(heads)]
    local = torch.tensor([64, 1, 0, 130][:len(heads)] * 2)[:len(heads)]
    return q, k, last_q, D ** -0.5, causal, heads, sink, local, group


def picked_groups(B, Hs, Lk, group, seed=3):
    picked = torch.rand(B, Hs, -(-Lk // group) + 1, generator=torch.Generator().manual_seed(seed)) < 0.5
    picked[..., -1] = False
    return picked


@pytest.mark.parametrize("name", list(CASES))
def test_torch_reference_matches_the_fp64_oracle(name):
    q, k, last_q, scale, causal, heads, sink, local, group = inputs(name)
    got = torch_sample_scores(q, k, last_q, scale, causal, heads=heads, sink=sink, local=local, group=group)
    column, off, diag, _, p, group_of, lse = oracle(q, k, last_q, scale, causal, heads, sink, local, group)
    for actual, expected in ((got.column, column), (got.column_off_local, off), (got.diagonal, diag),
                             (got.lse, lse)):
        torch.testing.assert_close(actual.double(), expected, atol=2e-5, rtol=1e-4)
    picked = picked_groups(q.shape[0], len(heads), k.shape[2], group)
    slot = torch.where(group_of >= 0, group_of, picked.shape[-1] - 1)                 # [n, Lk]
    expected = (p * picked[:, :, slot].double()).sum(2)               # mass on the picked diagonal groups
    torch.testing.assert_close(got.on_diagonals(picked, group).double(), expected, atol=2e-5, rtol=1e-4)


needs_cpu_pass = pytest.mark.skipif("not cpu_scores.available()", reason="the fused CPU score pass cannot be built")


@needs_cpu_pass
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_pass_matches_the_torch_reference(name):
    q, k, last_q, scale, causal, heads, sink, local, group = inputs(name)
    want = torch_sample_scores(q, k, last_q, scale, causal, heads=heads, sink=sink, local=local, group=group)
    got = cpu_scores.cpu_sample_scores(q, k, last_q, scale, causal, heads=heads, sink=sink, local=local,
                                       group=group, bf16=False)
    for field in ("column", "column_off_local", "diagonal", "by_group", "lse"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=2e-5, rtol=1e-4, msg=field)
    picked = picked_groups(q.shape[0], len(heads), k.shape[2], group)
    torch.testing.assert_close(got.on_diagonals(picked, group), want.on_diagonals(picked, group), atol=2e-5,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="group must be"):
        got.on_diagonals(picked, group * 2)


@needs_cpu_pass
@pytest.mark.skipif("not loader.native_low_precision(torch.bfloat16, 64)", reason="no native bf16 GEMM here")
@pytest.mark.parametrize("name", ["q65k113_mqa_subset", "q70k1000_gqa"])
def test_cpu_pass_bf16_matches_the_reference_on_the_same_rounded_inputs(name):
    """bf16 GEMMs with fp32 accumulation: against the reference on bf16-rounded inputs (the scaled sample rounded
    as the pass rounds it), so only summation order differs."""
    q, k, last_q, scale, causal, heads, sink, local, group = inputs(name)
    got = cpu_scores.cpu_sample_scores(q.bfloat16(), k.bfloat16(), last_q, scale, causal, heads=heads, sink=sink,
                                       local=local, group=group)
    q_rounded = (q.bfloat16().float() * scale).bfloat16().float()
    want = torch_sample_scores(q_rounded, k.bfloat16().float(), last_q, 1.0, causal, heads=heads, sink=sink,
                               local=local, group=group)
    for field in ("column", "column_off_local", "diagonal", "lse"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-4, rtol=1e-3, msg=field)


@needs_cpu_pass
@pytest.mark.skipif("not loader.native_low_precision(torch.bfloat16, 64)", reason="no native bf16 GEMM here")
@pytest.mark.parametrize("name", ["q63_gqa", "q65k113_mqa_subset", "q113_noncausal", "q70k1000_gqa"])
def test_cpu_pass_bf16_gemms_on_fp32_inputs(name):
    """fp32 inputs on the bf16 GEMMs (the default where the CPU has them; keys rounded a chunk at a time in the
    pass): equal to the reference on the rounded inputs up to summation order, and within the stated tolerance of
    the fp32 reference: each sample row's column and diagonal mass distributions move by at most 0.03 in L1 (so
    at most 3% of a row's mass changes place; measured 0.014 on the 4K synthetic and hard workloads), lse by 0.1."""
    q, k, last_q, scale, causal, heads, sink, local, group = inputs(name)
    assert cpu_scores.sample_low_precision(q)
    got = cpu_scores.cpu_sample_scores(q, k, last_q, scale, causal, heads=heads, sink=sink, local=local, group=group)
    q_rounded = (q.float() * scale).bfloat16().float()
    rounded = torch_sample_scores(q_rounded, k.bfloat16().float(), last_q, 1.0, causal, heads=heads, sink=sink,
                                  local=local, group=group)
    for field in ("column", "column_off_local", "diagonal", "by_group", "lse"):
        torch.testing.assert_close(getattr(got, field), getattr(rounded, field), atol=1e-4, rtol=1e-3, msg=field)
    exact = torch_sample_scores(q, k, last_q, scale, causal, heads=heads, sink=sink, local=local, group=group)
    n = min(last_q, q.shape[2])
    for field in ("column", "diagonal"):
        moved = (getattr(got, field) - getattr(exact, field)).abs().sum(-1) / n
        assert moved.max() <= 0.03, field
    assert (got.lse - exact.lse).abs().max() <= 0.1


def test_auto_dispatch_by_device_and_named_choices(monkeypatch):
    q, k, _ = make_qkv(1, 4, 2, 64, 64, 32)
    expected = "cpu" if cpu_scores.available() else "torch"
    assert score_backends.select_scores("auto", q, k).name == expected
    assert score_backends.select_scores("auto", q.double(), k.double()).name == "torch"    # fp64 stays exact
    assert score_backends.select_scores("torch", q, k) is score_backends.TORCH_SCORES
    with pytest.raises(ValueError, match="must be 'auto' or one of"):
        score_backends.select_scores("cupy", q, k)
    with pytest.raises(NotSupportedError, match="cpu"):
        score_backends.select_scores("cpu", q.double(), k.double())
    # where the pass cannot be built: auto takes the reference, naming it by choice says why not
    monkeypatch.setattr(cpu_scores, "available", lambda: False)
    assert score_backends.select_scores("auto", q, k).name == "torch"
    with pytest.raises(NotSupportedError, match="fused CPU score pass is unavailable"):
        score_backends.select_scores("cpu", q, k)


@needs_cpu_pass
@pytest.mark.parametrize("pattern", [sa.VerticalSlash(vertical=64, slash=256, sink=8, local=64),
                                     sa.VerticalSlash(vertical=256, slash=1024, gamma=0.9, min_vertical=16,
                                                      min_slash=64),
                                     sa.Auto(gamma=0.95)], ids=["topk", "gamma", "auto"])
@pytest.mark.parametrize("workload", ["text", "hard"])
def test_layouts_identical_with_cpu_and_torch_scores(pattern, workload, monkeypatch):
    """Batch 2 with different content, GQA, Lq < Lk off the 64 grid: the same layout from either implementation
    (the pass in fp32: its bf16 GEMMs are checked against the reference below)."""
    monkeypatch.setenv("SPARSE_ATTN_CPU_LOW_PRECISION", "0")
    assert not cpu_scores.sample_low_precision(torch.zeros(1, 1, 1, 64))
    if workload == "text":
        q, k, _ = make_workload(Workload(batch=2, q_heads=4, kv_heads=2, seq_len=1500, head_dim=64, seed=5))
    else:
        q, k, _ = make_hard_qkv(HardWorkload(batch=2, q_heads=4, kv_heads=2, seq_len=1500, head_dim=64))
    q = q[:, :, -1100:]
    layouts = [sa.estimate(q, k, pattern, scores_backend=name) for name in ("cpu", "torch")]
    for field in ("block_count", "column_count"):
        assert torch.equal(getattr(layouts[0], field), getattr(layouts[1], field)), field
    assert torch.equal(layouts[0].to_mask(1100, 1500), layouts[1].to_mask(1100, 1500))


@pytest.mark.parametrize("name", ["q63_gqa", "q65k113_mqa_subset", "q113_noncausal", "q70k1000_gqa"])
@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_rows_kept_mass_matches_an_fp64_oracle(name, impl, monkeypatch):
    """Held-out rows in several query blocks, a random valid layout (unaligned tiles, single columns, junk
    padding), odd lengths: the mass the rows keep on it equals an fp64 softmax summed over the layout's mask (the
    CPU pass in fp32 here; its bf16 GEMMs below)."""
    import random
    monkeypatch.setenv("SPARSE_ATTN_CPU_LOW_PRECISION", "0")

    from helpers import random_layout
    from sparse_attn.estimators.row_sample import rows_kept_mass
    if impl == "cpu" and not cpu_scores.available():
        pytest.skip("the fused CPU score pass cannot be built")
    q, k, _, scale, causal, heads, *_ = inputs(name)
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    rows = torch.tensor(sorted({0, Lq // 3, Lq // 2, Lq - 1}))
    layout, *_ = random_layout(random.Random(7), B, len(heads), Lq, Lk, 16, 16)
    fn = cpu_scores.cpu_rows_kept_mass if impl == "cpu" else rows_kept_mass
    got = fn(q, k, rows, scale, causal, heads=heads, layout=layout)
    logits = q.double()[:, heads][:, :, rows] @ k.double().repeat_interleave(Hq // k.shape[1], 1)[
        :, heads].transpose(-1, -2) * scale
    if causal:
        logits = logits.masked_fill(~causal_mask(Lq, Lk)[rows], float("-inf"))
    expected = (torch.softmax(logits, -1) * layout.to_mask(Lq, Lk)[:, :, rows]).sum(-1).mean(-1)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)


# B, Hq, Hkv, Lq, Lk, D, heads, dtype, rows: D = 128 and 64, GQA with a head subset out of order, Lq < Lk off the 64
# grid, rows out of order (one before the first key chunk ends, one at the last query), fp16 / bf16 inputs.
KEPT_CASES = {
    "d128_gqa_unsorted_rows": (2, 8, 2, 700, 1000, 128, [7, 0, 5, 2, 3], torch.float32, [699, 10, 350, 640, 200]),
    "d64_mqa_lq_lt_lk": (2, 4, 1, 300, 1111, 64, [2, 1], torch.float32, [0, 37, 150, 299]),
    "bf16_d128": (2, 4, 2, 513, 513, 128, [0, 1, 2, 3], torch.bfloat16, [100, 257, 300, 512]),
    "fp16_d64": (1, 4, 2, 400, 600, 64, [3, 1], torch.float16, [50, 123, 399]),
}


@needs_cpu_pass
@pytest.mark.parametrize("gemm", ["fp32", "native"])
@pytest.mark.parametrize("name", list(KEPT_CASES))
def test_rows_kept_mass_of_the_one_pass_check_on_more_shapes(name, gemm, monkeypatch):
    """The one-pass held-out check (online softmax, kept ranges summed per chunk, the GEMM cut to the rows that see
    a chunk) on batch 2 with different content, GQA / MQA head subsets, rows out of order, fp16 / bf16 inputs,
    non-contiguous keys: equal to an fp64 softmax summed over the layout's mask of the same (rounded) inputs (bf16
    GEMMs where the CPU has them, also for fp32 inputs: atol 2e-3 on a mass in [0, 1], a fifth of Auto's
    tolerance; forced fp32 GEMMs: 2e-5)."""
    import random
    monkeypatch.setenv("SPARSE_ATTN_CPU_LOW_PRECISION", "0" if gemm == "fp32" else "1")

    from helpers import random_layout
    B, Hq, Hkv, Lq, Lk, D, heads, dtype, rows = KEPT_CASES[name]
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=13, contiguity="strided", structured=True)
    q, k = q.to(dtype), k.to(dtype)
    heads, rows = torch.tensor(heads), torch.tensor(rows)
    layout, *_ = random_layout(random.Random(3), B, len(heads), Lq, Lk, 64, 64)
    scale = D ** -0.5
    got = cpu_scores.cpu_rows_kept_mass(q, k, rows, scale, True, heads=heads, layout=layout)
    logits = q.double()[:, heads][:, :, rows] @ k.double().repeat_interleave(Hq // Hkv, 1)[
        :, heads].transpose(-1, -2) * scale
    logits = logits.masked_fill(~causal_mask(Lq, Lk)[rows], float("-inf"))
    expected = (torch.softmax(logits, -1) * layout.to_mask(Lq, Lk)[:, :, rows]).sum(-1).mean(-1)
    assert expected.min() > 0.01 and expected.max() < 0.99           # a layout that keeps part of the mass
    atol = 2e-3 if cpu_scores.low_precision(q) else 2e-5
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=0)
