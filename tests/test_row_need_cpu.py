"""Auto's early dense routing count on the CPU (`estimators.cpu_row_need`, ``csrc/row_need_cpu.cpp``) against its
readable torch path (`auto._row_keys_torch`) and the exact sort (`mass_count.keys_for_mass_sorted`): awkward shapes,
every input dtype, head subsets, concentrated and diffuse rows, and Auto's choices on the audit workloads."""
import pytest
import torch

import sparse_attn as sa
from sparse_attn.estimators import cpu_row_need, mass_count
from sparse_attn.estimators.sample_mass import last_query_probs
from sparse_attn.patterns import auto
from sparse_attn.tools.bench import _inputs
from helpers import make_qkv

pytestmark = pytest.mark.skipif(cpu_row_need.load() is None, reason="the compiled row-need count cannot be built here")

STRIDE = 8
# B, Hq, Hkv, Lq, Lk, D, n, causal, contiguity, heads: lengths off the 8 and 64 grids, Lq < Lk, fewer query rows
# than n, MHA / GQA / MQA, head subsets out of order (all heads come ascending, as `estimate` groups them),
# non-contiguous inputs (a strided last dimension: the op gets a copy of the scored keys; BLHD: it reads them in
# place).
CASES = {
    "gqa_causal": (1, 8, 2, 1000, 1000, 128, 16, True, "contiguous", list(range(8))),
    "mqa_subset_q65k113": (2, 4, 1, 65, 113, 64, 16, True, "strided", [3, 0]),
    "mha_noncausal_113": (2, 3, 3, 113, 113, 16, 16, False, "contiguous", [0, 1, 2]),
    "q5k3001_blhd": (1, 4, 2, 5, 3001, 64, 16, True, "blhd", [1, 2, 3]),
    "q1k1": (1, 2, 1, 1, 1, 32, 16, True, "contiguous", [0, 1]),
    "q40k2051_gqa_noncausal": (2, 6, 2, 40, 2051, 80, 16, False, "blhd", [5, 1, 4]),
}


def _inputs_of(name, dtype=torch.float32, spread=1.0):
    """The case's q, k (``spread`` scales the logits: small is diffuse, large concentrated) and its arguments."""
    B, Hq, Hkv, Lq, Lk, D, n, causal, contiguity, heads = CASES[name]
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=7, contiguity=contiguity, structured=True)
    q = (q * spread).to(dtype)
    return q, k.to(dtype), min(n, Lq), D ** -0.5, causal, torch.tensor(heads)


def _both(q, k, n, scale, causal, heads, gamma=0.95):
    kw = dict(heads=heads, key_stride=STRIDE, gamma=gamma)
    return (cpu_row_need.cpu_row_need(q, k, n, scale, causal, **kw)[0],
            auto._row_keys_torch(q, k, n, scale, causal, **kw))


def _near_exact(q, k, n, scale, causal, heads, gamma):
    """The exact key counts (a sort) and, per row, the keys within the histogram's resolution of the answer: those
    whose probability lies within a bucket's factor of the exact answer's last key (as in test_estimate_cost)."""
    probs = last_query_probs(q, k, n, scale, causal, key_stride=STRIDE)[0].index_select(1, heads)
    exact = mass_count.keys_for_mass_sorted(probs, gamma)
    last = probs.sort(-1, descending=True).values.gather(-1, exact[..., None] - 1)
    ratio = torch.exp(torch.tensor(1 / mass_count.BUCKETS_PER_NAT))
    near = ((probs <= last * ratio) & (probs >= last / ratio)).sum(-1).float()
    return exact.float(), near


@pytest.mark.parametrize("spread", [0.05, 1.0, 6.0])             # diffuse, text-like, concentrated rows
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_count_is_the_torch_count(name, spread):
    q, k, n, scale, causal, heads = _inputs_of(name, spread=spread)
    got, want = _both(q, k, n, scale, causal, heads)
    assert got.shape == want.shape == (q.shape[0], len(heads), n) and got.dtype == torch.float32
    # the same histogram of the same logits: equal, but for a key whose log-probability lies on a bucket edge
    # (fp32 rounding differs between the fused softmax and torch's): a key more or less before the crossing
    assert ((got - want).abs() <= 2).all(), (got - want).abs().max()
    assert (got == want).float().mean() >= 0.9
    exact, near = _near_exact(q, k, n, scale, causal, heads, 0.95)
    assert ((got - exact).abs() <= near).all()
    assert (got >= 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gqa_causal", "mqa_subset_q65k113", "q40k2051_gqa_noncausal"])
def test_low_precision_inputs_count_as_the_torch_path_does(name, dtype):
    # bf16/fp16 inputs are scored in fp32 on both paths (exact conversions): the same counts as for fp32
    q, k, n, scale, causal, heads = _inputs_of(name, dtype)
    got, want = _both(q, k, n, scale, causal, heads)
    assert ((got - want).abs() <= 2).all() and (got == want).float().mean() >= 0.9


def test_gamma_and_batch_rows_change_the_count():
    q, k, n, scale, causal, heads = _inputs_of("mqa_subset_q65k113")
    low, _ = _both(q, k, n, scale, causal, heads, gamma=0.5)
    high, want = _both(q, k, n, scale, causal, heads, gamma=0.99)
    assert (low <= high).all() and (low < high).any()
    assert ((high - want).abs() <= 2).all()
    assert not torch.equal(high[0], high[1])                      # batch rows with different content


def test_row_need_takes_the_compiled_count_and_matches_the_torch_path(monkeypatch):
    q, k, n, scale, causal, heads = _inputs_of("mqa_subset_q65k113", spread=0.3)
    p = sa.Auto()
    calls = []
    compiled = cpu_row_need.cpu_row_need
    monkeypatch.setattr(cpu_row_need, "cpu_row_need", lambda *a, **kw: calls.append(1) or compiled(*a, **kw))
    got = auto._row_need(q, k, heads, p, scale, causal)
    assert calls, "the CPU path should use the compiled count"
    monkeypatch.setattr(cpu_row_need, "takes", lambda q, k: False)
    want = auto._row_need(q, k, heads, p, scale, causal)
    assert got.shape == want.shape == (2, 2) and got.dtype == torch.float32
    # the share: the same counts over the same visible keys (a key more or less, as above)
    needed = compiled(q, k, n, scale, causal, heads=heads, key_stride=STRIDE, gamma=p.gamma)[0]
    visible = (torch.arange(k.shape[2] - n, k.shape[2]) + 1 + STRIDE - 1) // STRIDE
    torch.testing.assert_close(got, (needed / visible).amax(-1), rtol=0, atol=0)
    assert ((got - want).abs() <= 2 / visible.min()).all()
    assert (got > 0).all() and (got <= 1).all()


def test_without_the_op_or_for_fp64_the_torch_path_runs(monkeypatch):
    q, k, _, scale, causal, heads = _inputs_of("gqa_causal")
    want = auto._row_need(q, k, heads, sa.Auto(), scale, causal)
    assert not cpu_row_need.takes(q.double(), k.double())                 # fp64 stays in the torch path, in fp64
    got64 = auto._row_need(q.double(), k.double(), heads, sa.Auto(), scale, causal)
    assert ((got64 - want).abs() <= 2 / -(-k.shape[2] // STRIDE)).all()
    monkeypatch.setattr(cpu_row_need, "load", lambda: None)               # not built here (or turned off)
    assert not cpu_row_need.takes(q, k)
    torch.testing.assert_close(auto._row_need(q, k, heads, sa.Auto(), scale, causal), want, rtol=0,
                               atol=2 / -(-k.shape[2] // STRIDE))


@pytest.mark.parametrize("workload,L", [("text", 4099), ("hard", 4096), ("hard", 6000), ("diffuse", 3000)])
def test_auto_choices_on_the_audit_workloads_are_unchanged(workload, L, monkeypatch):
    q, k, _, _ = _inputs(workload, L, 8, 2, 128)
    heads = torch.arange(8)
    shares = auto._row_need(q, k, heads, sa.Auto(), 128 ** -0.5, True)
    got = auto.choose_per_head(q, k, sa.Auto())
    monkeypatch.setattr(cpu_row_need, "takes", lambda q, k: False)
    want = auto.choose_per_head(q, k, sa.Auto())
    assert torch.equal(got, want), (got, want)
    want_shares = auto._row_need(q, k, heads, sa.Auto(), 128 ** -0.5, True)
    assert ((shares - want_shares).abs() <= 2 / -(-L // STRIDE)).all()
    if workload == "diffuse":                                     # the dense route is taken
        assert (got == auto.DENSE).all() and (shares > sa.Auto().dense_share).all()


def test_bad_inputs_are_refused_by_the_op():
    ops = cpu_row_need.load()
    q = torch.randn(1, 2, 4, 16)
    k = torch.randn(1, 1, 9, 16)
    heads = torch.tensor([0, 1])
    tail = (1.0, 1, 9, True, 0.95, mass_count.BUCKETS_PER_NAT, mass_count.N_BUCKETS)
    ops.row_need(q, k, heads, 4, *tail)                                               # well formed
    with pytest.raises(RuntimeError, match="heads must index"):
        ops.row_need(q, k, torch.tensor([0, 2]), 4, *tail)
    with pytest.raises(RuntimeError, match="every stride-th"):
        ops.row_need(q, k[:, :, :4], heads, 4, *tail)
    with pytest.raises(RuntimeError, match="n <= Lq"):
        ops.row_need(q, k, heads, 5, *tail)
    with pytest.raises(RuntimeError, match="must be fp32, bf16 or fp16"):
        ops.row_need(q.double(), k, heads, 4, *tail)
