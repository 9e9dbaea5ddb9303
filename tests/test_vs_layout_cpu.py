"""The compiled vertical-slash layout (`patterns.vertical_slash_cpu`, ``csrc/vertical_slash_layout_cpu.cpp``) against
the torch path it replaces on the CPU: the same four index tensors, entry for entry, on every kind of input the
estimator meets; its layouts against the dense oracle; the torch path where it cannot run."""
from __future__ import annotations

import random

import pytest
import torch

import sparse_attn as sa
from sparse_attn.estimators.sample_mass import GroupedScores
from sparse_attn.patterns import vertical_slash as vs
from sparse_attn.patterns import vertical_slash_cpu
from tests.helpers import assert_close, make_qkv, random_layout

pytestmark = pytest.mark.skipif(vertical_slash_cpu.load() is None, reason="no C++ compiler here")

_FIELDS = ("block_count", "block_offset", "column_count", "column_index")


def _build(q, k, patterns, heads=None, *, torch_path: bool, monkeypatch, causal=True, block_m=64, block_n=64,
           scores_backend="auto"):
    heads = torch.arange(q.shape[1]) if heads is None else heads
    with monkeypatch.context() as m:
        used = []
        real = vertical_slash_cpu.vertical_slash_layout

        def spy(*a, **kw):
            used.append(True)
            return real(*a, **kw)

        m.setattr(vertical_slash_cpu, "vertical_slash_layout", spy)
        if torch_path:
            m.setattr(vertical_slash_cpu, "takes", lambda *a: False)
        layout = vs.VerticalSlash.build(list(patterns), heads, q, k, causal=causal, scale=q.shape[-1] ** -0.5,
                                        block_m=block_m, block_n=block_n, scores_backend=scores_backend)
    assert bool(used) != torch_path, "the compiled call ran where it should not, or not where it should"
    return layout


def _assert_same(q, k, patterns, monkeypatch, **kw):
    got = _build(q, k, patterns, torch_path=False, monkeypatch=monkeypatch, **kw)
    want = _build(q, k, patterns, torch_path=True, monkeypatch=monkeypatch, **kw)
    for name in _FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype == torch.int32 and a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.equal(a, b), f"{name} differs at {(a != b).nonzero()[:5].tolist()}"
    got.check()
    return got


GAMMA = sa.VerticalSlash(vertical=300, slash=2048, gamma=0.9, min_vertical=16, min_slash=64)
FIXED = sa.VerticalSlash(vertical=40, slash=256, sink=8, local=32)
# gamma 1: every decision sits at the sums' rounding edge (the mass before an entry against all of it)
ALL_MASS = sa.VerticalSlash(vertical=300, slash=2048, gamma=1.0, min_vertical=16, min_slash=64)


@pytest.mark.parametrize("pattern", [GAMMA, FIXED, ALL_MASS], ids=["gamma", "fixed", "gamma1"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq, lk", [(1000, 1000), (300, 1337), (65, 65)])
def test_same_layout_as_the_torch_path(pattern, causal, lq, lk, monkeypatch):
    # batch 2 with different content, GQA, L not a multiple of 64, Lq < Lk
    q, k, _ = make_qkv(B=2, Hq=4, Hkv=2, Lq=lq, Lk=lk, D=32, seed=lq + lk, structured=True)
    layout = _assert_same(q, k, [pattern] * 4, monkeypatch, causal=causal)
    if lk > 300:                                   # (65 keys: the forced sink and band hold nearly all of them)
        assert not all(torch.equal(getattr(layout, f)[0], getattr(layout, f)[1]) for f in _FIELDS)   # rows differ


@pytest.mark.parametrize("block_m, block_n", [(64, 32), (32, 64), (128, 16), (48, 80)])
def test_same_layout_with_other_block_sizes(block_m, block_n, monkeypatch):
    # block_n < 64 splits the sample rows over more diagonal groups per key (by_group's G = 3 or 5)
    q, k, _ = make_qkv(B=1, Hq=2, Hkv=1, Lq=700, Lk=900, D=32, seed=block_n, structured=True)
    _assert_same(q, k, [GAMMA, FIXED], monkeypatch, block_m=block_m, block_n=block_n)


def test_same_layout_with_budgets_per_head_and_a_head_subset(monkeypatch):
    q, k, _ = make_qkv(B=2, Hq=6, Hkv=3, Lq=800, Lk=800, D=32, seed=3, structured=True)
    patterns = [GAMMA, FIXED, sa.VerticalSlash(100, 512, gamma=0.99, min_vertical=4, min_slash=64),
                sa.VerticalSlash(1000, 128, gamma=0.5, sink=0, local=0, min_vertical=0, min_slash=0)]
    heads = torch.tensor([0, 2, 3, 5])                       # an Auto rung builds on some slots only
    _assert_same(q, k, patterns, monkeypatch, heads=heads)


@pytest.mark.parametrize("kind", ["uniform", "coarse", "diffuse"])
@pytest.mark.parametrize("pattern", [GAMMA, FIXED], ids=["gamma", "fixed"])
def test_same_layout_when_masses_tie(kind, pattern, monkeypatch):
    # uniform attention: every column before the sample (and many diagonals) has exactly the same mass, so the
    # budgets cut through runs of equal values; coarse: few distinct logits, many small ties; diffuse: nearly
    # uniform, so gamma needs most entries (the walk goes far down the ranking)
    q, k, _ = make_qkv(B=2, Hq=2, Hkv=1, Lq=640, Lk=640, D=16, seed=7)
    if kind == "uniform":
        q = torch.zeros_like(q)
    elif kind == "diffuse":
        q = q * 0.05
    else:
        q, k = q.sign(), (k * 0.5).round()
    layout = _assert_same(q, k, [pattern] * 2, monkeypatch)
    if kind == "uniform" and pattern is FIXED:
        # equal masses go to the lower index: the budget takes the first columns (the last block's tiles lie far
        # from them)
        cols = layout.column_index[0, 0, -1, :layout.column_count[0, 0, -1]]
        assert cols.tolist() == list(range(pattern.vertical))


def _random_case(rng: random.Random, seed: int):
    """Random shapes, block sizes, head subsets and per-head budgets (gamma or not, 0 to more than Lk)."""
    hkv, group = rng.choice([1, 2]), rng.choice([1, 2, 3])
    lk = rng.choice([1, 17, 64, 65, 130, 500, 1111])
    q, k, _ = make_qkv(B=rng.choice([1, 2]), Hq=hkv * group, Hkv=hkv, Lq=rng.randint(1, lk), Lk=lk, D=16, seed=seed,
                       structured=rng.random() < 0.5)
    heads = sorted(rng.sample(range(hkv * group), rng.randint(1, hkv * group)))
    last_q, patterns = rng.choice([16, 64, 100]), []
    for _ in heads:
        v, s = rng.choice([0, 1, 5, 40, 300]), rng.choice([0, 1, 64, 200, 2000])
        sink, local = min(rng.choice([0, 4, 64]), v), min(rng.choice([0, 16, 64]), s)
        if v == s == 0:
            sink = local = 0
        patterns.append(sa.VerticalSlash(v, s, last_q=last_q, sink=sink, local=local,
                                         gamma=rng.choice([None, 0.5, 0.9, 1.0]), min_vertical=rng.choice([0, 8]),
                                         min_slash=rng.choice([0, 64, 512])))
    kw = dict(causal=rng.random() < 0.7, block_m=rng.choice([16, 64, 128]), block_n=rng.choice([32, 48, 64]),
              scores_backend=rng.choice(["torch", "cpu"]))
    return q, k, patterns, torch.tensor(heads), kw


@pytest.mark.parametrize("seed", range(4))
def test_same_layout_on_random_configurations(seed, monkeypatch):
    rng = random.Random(seed)
    for i in range(6):
        q, k, patterns, heads, kw = _random_case(rng, 10 * seed + i)
        _assert_same(q, k, patterns, monkeypatch, heads=heads, **kw)


@pytest.mark.parametrize("scores_backend", ["torch", "cpu"])
def test_same_layout_from_either_sample_scorer(scores_backend, monkeypatch):
    q, k, _ = make_qkv(B=1, Hq=4, Hkv=1, Lq=1200, Lk=1200, D=64, seed=11, structured=True)
    _assert_same(q, k, [sa.Auto().vertical_slash(1200)] * 4, monkeypatch, scores_backend=scores_backend)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_through_the_compiled_layout_matches_the_dense_oracle(causal):
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Lq=500, Lk=777, D=32, seed=5, structured=True)
    pattern = sa.VerticalSlash(vertical=64, slash=256, gamma=0.9, min_vertical=16, min_slash=64)
    layout = sa.estimate(q, k, pattern, causal=causal)
    out = sa.sparse_prefill(q, k, v, pattern, causal=causal, backend="torch", dense_below=0)
    want = sa.reference_attention(q, k, v, layout.to_mask(), causal=causal)
    assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert layout.density(causal) < 0.9                           # sparse, so the mask mattered


def test_torch_path_where_the_compiled_call_cannot_run(monkeypatch):
    q, k, _ = make_qkv(B=1, Hq=2, Hkv=1, Lq=300, Lk=300, D=16, seed=2)
    sample = GroupedScores(*(torch.zeros(1),) * 5, pos0=0, group=64)
    assert vertical_slash_cpu.takes(sample, "cpu", 64, 64)
    assert not vertical_slash_cpu.takes(sample, "cpu", 64, 32)         # split by other groups than block_n
    assert not vertical_slash_cpu.takes(sample, "meta", 64, 64)
    assert not vertical_slash_cpu.takes(object(), "cpu", 64, 64)         # a sample without by_group (Triton's)
    monkeypatch.setattr(vertical_slash_cpu, "load", lambda: None)         # not built here
    assert not vertical_slash_cpu.takes(sample, "cpu", 64, 64)
    monkeypatch.setattr(vertical_slash_cpu, "vertical_slash_layout", None)   # calling it would raise
    layout = vs.VerticalSlash.build([FIXED] * 2, torch.arange(2), q, k, causal=True, scale=0.25, block_m=64,
                                    block_n=64)
    assert layout.check().column_count.sum() > 0


def test_order_key_orders_by_value_then_lower_index():
    score = torch.tensor([[0.5, -1.0, 0.5, float("inf"), 0.0, -1.0, 2.0, float("inf")]])
    order = vs.order_key(score).argsort(-1, descending=True)[0].tolist()
    assert order == [3, 7, 6, 0, 2, 4, 1, 5]


@pytest.mark.parametrize("causal", [True, False])
def test_key_counts_match_the_layouts_own(causal):
    # the estimators' layouts, and random ones (unaligned tiles and columns anywhere, junk padding, block_m !=
    # block_n): the compiled count is the same integers
    from sparse_attn.patterns.base import computed_share
    q, k, _ = make_qkv(B=2, Hq=4, Hkv=2, Lq=333, Lk=1000, D=16, seed=9, structured=True)
    layouts = [sa.estimate(q, k, p, causal=causal) for p in (sa.VerticalSlash(64, 256), sa.AShape(16, 200),
                                                             sa.BlockSparse(top_k=3), sa.Auto())]
    rng = random.Random(4)
    layouts += [random_layout(rng, 2, 3, lq, lk, bm, bn)[0] for lq, lk, bm, bn in ((100, 300, 64, 32),
                                                                               (257, 257, 32, 64), (65, 1000, 64, 64))]
    for layout in layouts:
        got = vertical_slash_cpu.key_counts(layout, causal)
        want = layout.key_counts(causal)
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert 0 < float(computed_share(layout, causal).max())
    assert vertical_slash_cpu.key_counts(layouts[0].to("meta"), causal) is None
