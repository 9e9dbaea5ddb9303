"""The held-out check's fused CPU pass (`cpu_scores.cpu_rows_kept_mass`, csrc/kept_mass.h) on both of its code
paths: the AVX-512 / AVX512_BF16 one this machine's build has (``native=True``) and the portable loops
(``native=False``), each against an fp64 softmax summed over the layout's mask, and against each other; layouts with
tiles and columns in order (merged) and shuffled (sorted), adjacent and overlapping ranges."""
import random

import pytest
import torch

import sparse_attn as sa
from sparse_attn.estimators import cpu_scores
from sparse_attn.estimators.row_sample import rows_kept_mass
from helpers import causal_mask, make_qkv, random_layout

pytestmark = pytest.mark.skipif("not cpu_scores.available()", reason="the fused CPU score pass cannot be built")

# B, Hq, Hkv, Lq, Lk, D, heads, dtype, rows, layout of q and k: lengths off the 64 grid, Lq < Lk, MHA / GQA / MQA,
# head subsets out of order, rows at the first query, in the first block, on block edges and at the last query; a
# unit of 15 rows (not a multiple of the 16-row vector blocks) and one of 3 x 40 rows (blocks that the GEMM's first
# row cuts in the middle); keys spanning several chunks; fp32 and bf16 inputs; keys read in place with a row stride
# other than D (BLHD: converted and prefetched row by row).
CASES = {
    "mha_15rows_lq_lt_lk": (2, 3, 3, 777, 1000, 64, [2, 0, 1], torch.float32, [0, 1, 63, 64, 776], "contiguous"),
    "gqa_3x40rows_blhd": (2, 6, 2, 1000, 1000, 128, [0, 1, 2, 3, 4, 5], torch.float32, list(range(5, 1000, 25)),
                          "blhd"),
    "mqa_subset_bf16": (2, 4, 1, 300, 1111, 64, [3, 1], torch.bfloat16, [0, 37, 150, 255, 256, 299], "contiguous"),
    "d48_rows_at_end_blhd_bf16": (1, 4, 2, 520, 520, 48, [1, 0, 3], torch.bfloat16, [448, 500, 511, 512, 519],
                                  "blhd"),
    "d48_rows_at_end": (1, 2, 1, 520, 520, 48, [1, 0], torch.float32, [448, 500, 511, 512, 519], "contiguous"),
}


def oracle(q, k, rows, heads, layout, scale):
    """fp64 softmax of the rows (causal, bottom-right) times the layout's key mask, summed, mean over rows."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    kk = k.double().repeat_interleave(Hq // k.shape[1], 1)[:, heads]
    logits = q.double()[:, heads][:, :, rows] @ kk.transpose(-1, -2) * scale
    logits = logits.masked_fill(~causal_mask(Lq, Lk)[rows], float("-inf"))
    return (torch.softmax(logits, -1) * layout.to_mask(Lq, Lk)[:, :, rows]).sum(-1).mean(-1)


def inputs(name, order):
    B, Hq, Hkv, Lq, Lk, D, heads, dtype, rows, contiguity = CASES[name]
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, seed=17, structured=True, contiguity=contiguity)
    assert contiguity == "contiguous" or (k.stride(-1) == 1 and k.stride(2) != D)
    layout, *_ = random_layout(random.Random(5), B, len(heads), Lq, Lk, 64, 64, shuffle=order == "shuffled")
    return q, k, torch.tensor(rows), torch.tensor(heads), layout, D ** -0.5


@pytest.mark.parametrize("order", ["in_order", "shuffled"])
@pytest.mark.parametrize("gemm", ["fp32", "native"])
@pytest.mark.parametrize("name", list(CASES))
def test_both_paths_match_the_fp64_oracle_and_each_other(name, gemm, order, monkeypatch):
    """Each path within the tolerance of its GEMM precision of fp64 (fp32 GEMMs: 2e-5; bf16 GEMMs, where the CPU
    has them: 2e-3, a fifth of Auto's tolerance), and the two paths within 1e-5 of each other (same rounding of
    the keys, exponentials 2e-7 apart)."""
    monkeypatch.setenv("SPARSE_ATTN_CPU_LOW_PRECISION", "0" if gemm == "fp32" else "1")
    q, k, rows, heads, layout, scale = inputs(name, order)
    expected = oracle(q, k, rows, heads, layout, scale)
    assert expected.min() > 0.01 and expected.max() < 0.99           # a layout that keeps part of the mass
    atol = 2e-3 if cpu_scores.low_precision(q) else 2e-5
    got = {native: cpu_scores.cpu_rows_kept_mass(q, k, rows, scale, True, heads=heads, layout=layout,
                                                 native=native) for native in (True, False)}
    for native, mass in got.items():
        torch.testing.assert_close(mass.double(), expected, atol=atol, rtol=0, msg=f"native={native}")
    torch.testing.assert_close(got[True], got[False], atol=1e-5, rtol=0)


@pytest.mark.parametrize("native", [True, False])
def test_adjacent_and_overlapping_ranges_count_as_the_reference_does(native, monkeypatch):
    """Hand-made ranges: tiles side by side, a tile overlapping another (its shared keys counted twice, as the
    readable reference counts them), a tile across a chunk edge, a column inside a tile (a range that ends before
    the one that starts earlier: the cursor must keep the longer one), columns next to each other and out of
    order, tiles past the last key: the pass equals `row_sample.rows_kept_mass` on them (fp32 GEMMs)."""
    monkeypatch.setenv("SPARSE_ATTN_CPU_LOW_PRECISION", "0")
    q, k, _ = make_qkv(2, 2, 1, 700, 700, 64, seed=23, structured=True)
    rows, heads = torch.tensor([130, 400, 699]), torch.tensor([1, 0])
    n_qb = 11
    tiles = [[0, 64, 128, 160], [300, 250, 640, 690], [5, 600]]        # adjacent; overlapping, past the end
    cols = [[200, 129, 201, 202], [10, 11, 9, 399], [3, 650, 699]]   # inside a tile, adjacent, unordered
    bc = torch.zeros(2, 2, n_qb, dtype=torch.int32)
    bo = torch.zeros(2, 2, n_qb, 4, dtype=torch.int32)
    cc = torch.zeros_like(bc)
    ci = torch.zeros(2, 2, n_qb, 4, dtype=torch.int32)
    for b in range(2):
        for h in range(2):
            for qb in range(n_qb):
                t, c = tiles[(b + h + qb) % 3], cols[(b + 2 * h + qb) % 3]
                bc[b, h, qb], cc[b, h, qb] = len(t), len(c)
                bo[b, h, qb, :len(t)] = torch.tensor(t, dtype=torch.int32)
                ci[b, h, qb, :len(c)] = torch.tensor(c, dtype=torch.int32)
    layout = sa.SparseLayout(bc, bo, cc, ci, q_len=700, k_len=700, block_m=64, block_n=64)
    got = cpu_scores.cpu_rows_kept_mass(q, k, rows, 0.125, True, heads=heads, layout=layout, native=native)
    expected = rows_kept_mass(q, k, rows, 0.125, True, heads=heads, layout=layout)
    assert (expected > 0.05).all()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
