"""Public entry points: `sparse_prefill` (dense fallback, sparse path, default pattern), `dense_attention`, and
clear errors for bad input (each message names the argument)."""
import pytest
import torch

import sparse_attn as sa
from helpers import HEAD_CONFIGS, assert_close, make_qkv, per_head_mix, sdpa


# ---------------------------------------------------------------------------------------------------- sparse_prefill
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,heads", [(1, 1, "mha"), (113, 113, "gqa"), (65, 300, "mqa"), (1, 130, "gqa")])
def test_dense_fallback_below_threshold(lq, lk, heads, causal):
    hq, hkv = HEAD_CONFIGS[heads]
    q, k, v = make_qkv(2, hq, hkv, lq, lk, 64, seed=lq, contiguity="blhd")
    pattern = sa.AShape(sink=4, local=16)       # would drop keys if it ran sparse
    out = sa.sparse_prefill(q, k, v, pattern, causal=causal)                 # default threshold >> lk
    dense = sa.reference_attention(q, k, v, causal=causal)
    assert_close(out, dense, atol=2e-5)
    out2 = sa.sparse_prefill(q, k, v, pattern, causal=causal, dense_below=lk + 1)
    assert_close(out2, dense, atol=2e-5)


def test_threshold_switches_to_the_sparse_path():
    q, k, v = make_qkv(1, 2, 2, 300, 300, 64, seed=2)
    pattern = sa.AShape(sink=4, local=16)
    dense = sa.reference_attention(q, k, v)
    assert_close(sa.sparse_prefill(q, k, v, pattern, dense_below=301), dense, atol=2e-5)
    sparse = sa.sparse_prefill(q, k, v, pattern, dense_below=300)          # lk == threshold: not below
    assert (sparse - dense).abs().max() > 1e-2


def test_default_threshold_is_the_devices(monkeypatch):
    """dense_below=None means `dense_below_for` the inputs' device: 4096 keys on the CPU, 65536 on CUDA."""
    from sparse_attn import prefill

    assert prefill.dense_below_for("cpu") == prefill.DENSE_BELOW == 4096
    assert prefill.dense_below_for(torch.device("cuda", 0)) == prefill.DENSE_BELOW_CUDA == 65536
    q, k, v = make_qkv(1, 2, 2, 300, 300, 64, seed=2)
    pattern = sa.AShape(sink=4, local=16)
    monkeypatch.setattr(prefill, "DENSE_BELOW", 300)                       # the CPU default, moved to lk
    sparse = sa.sparse_prefill(q, k, v, pattern)
    assert (sparse - sa.reference_attention(q, k, v)).abs().max() > 1e-2   # ran sparse: the CPU default applied
    monkeypatch.setattr(prefill, "DENSE_BELOW", 301)
    assert_close(sa.sparse_prefill(q, k, v, pattern), sa.reference_attention(q, k, v), atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,heads", [(1000, 1000, "gqa"), (65, 300, "mha"), (113, 113, "mqa"), (1, 130, "gqa")])
@pytest.mark.parametrize("pattern", ["vslash", "ashape", "block", "mix"])
def test_sparse_path_matches_oracle_with_the_estimated_layout(pattern, lq, lk, heads, causal):
    hq, hkv = HEAD_CONFIGS[heads]
    q, k, v = make_qkv(2, hq, hkv, lq, lk, 64, seed=lk, contiguity="strided", structured=True)
    p = {"vslash": sa.VerticalSlash(vertical=32, slash=128, sink=8, local=64), "ashape": sa.AShape(sink=8, local=64),
         "block": sa.BlockSparse(top_k=3), "mix": per_head_mix(hq, lk)}[pattern]
    out = sa.sparse_prefill(q, k, v, p, causal=causal, dense_below=0)
    layout = sa.estimate(q, k, p, causal=causal)
    if lq == 1000:
        assert layout.density(causal) < 0.9
    assert_close(out, sa.reference_attention(q, k, v, layout.to_mask(), causal=causal))
    assert_close(out, sa.sparse_attention(q, k, v, layout, causal=causal), atol=1e-6)


def test_default_pattern_runs_and_matches_its_layout():
    q, k, v = make_qkv(2, 4, 2, 600, 600, 64, seed=4, structured=True)
    out = sa.sparse_prefill(q, k, v, dense_below=0)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    layout = sa.estimate(q, k, None)
    assert_close(out, sa.reference_attention(q, k, v, layout.to_mask()))
    assert_close(out, sa.sparse_prefill(q, k, v, sa.DEFAULT_PATTERN, dense_below=0), atol=0)
    # and the default (dense below the threshold) call runs too
    assert_close(sa.sparse_prefill(q, k, v), sa.reference_attention(q, k, v), atol=2e-5)


def test_all_dense_patterns_take_the_dense_path():
    q, k, v = make_qkv(2, 2, 1, 300, 300, 64, seed=7)
    out = sa.sparse_prefill(q, k, v, [sa.Dense(), sa.Dense()], dense_below=0)
    assert_close(out, sa.reference_attention(q, k, v), atol=2e-5)


@pytest.mark.parametrize("lq,lk,causal,heads", [(300, 300, True, "gqa"), (130, 700, True, "mqa"),
                                                 (200, 451, False, "mha"), (127, 300, True, "gqa")])
def test_dense_cases_run_on_a_backend_cheaper_per_key_than_sdpa(monkeypatch, lq, lk, causal, heads):
    """Below the threshold, for all-Dense patterns and where the guard fires: the chosen backend over an all-keys
    layout where it computes a key cheaper than SDPA (cost_per_key < 1) and there are at least
    DENSE_ON_BACKEND_MIN_QUERIES queries, else SDPA; the oracle's result either way."""
    from sparse_attn import prefill
    from sparse_attn.backends.torch import TORCH
    hq, hkv = HEAD_CONFIGS[heads]
    q, k, v = make_qkv(2, hq, hkv, lq, lk, 32, seed=lq + lk, contiguity="blhd")
    runs, sdpa_calls = [], []
    real_run, real_dense = type(TORCH).run, prefill._dense
    monkeypatch.setattr(type(TORCH), "run", lambda self, q, k, v, layout, **kw: (
        runs.append(layout.density()), real_run(self, q, k, v, layout, **kw))[1])
    monkeypatch.setattr(prefill, "_dense", lambda *a, **kw: (sdpa_calls.append(1), real_dense(*a, **kw))[1])
    ref = sa.reference_attention(q, k, v, causal=causal)
    uses_backend = lq >= prefill.DENSE_ON_BACKEND_MIN_QUERIES
    for cost in (0.5, 2.0):
        monkeypatch.setattr(type(TORCH), "cost_per_key", cost)
        for call in (lambda: sa.sparse_prefill(q, k, v, sa.AShape(sink=4, local=16), causal=causal, backend="torch"),
                     lambda: sa.sparse_prefill(q, k, v, sa.Dense(), causal=causal, dense_below=0, backend="torch")):
            runs.clear(), sdpa_calls.clear()
            assert_close(call(), ref, atol=2e-5)
            on_backend = cost < 1 and uses_backend
            assert runs == ([1.0] if on_backend else []) and len(sdpa_calls) == (0 if on_backend else 1)


def test_sparse_prefill_scale_and_low_precision():
    q, k, v = make_qkv(2, 2, 2, 200, 200, 64, seed=9, dtype=torch.float16)
    p = sa.AShape(sink=8, local=64)
    out = sa.sparse_prefill(q, k, v, p, scale=0.2, dense_below=0)
    assert out.dtype == torch.float16
    layout = sa.estimate(q, k, p, scale=0.2)
    exact = sa.reference_attention(q.float(), k.float(), v.float(), layout.to_mask(), scale=0.2)
    assert (out.float() - exact).abs().max() < 2e-3
    dense = sa.sparse_prefill(q, k, v, p, scale=0.2)
    assert (dense.float() - sa.reference_attention(q.float(), k.float(), v.float(), scale=0.2)).abs().max() < 2e-3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,heads", [(1, 1, "mha"), (63, 63, "gqa"), (65, 300, "mqa"), (1, 130, "gqa")])
def test_dense_attention_matches_reference(lq, lk, heads, causal):
    hq, hkv = HEAD_CONFIGS[heads]
    q, k, v = make_qkv(2, hq, hkv, lq, lk, 80, seed=lq + lk, contiguity="blhd")
    out = sa.dense_attention(q, k, v, causal=causal)
    assert_close(out, sa.reference_attention(q, k, v, causal=causal), atol=2e-5)
    assert_close(out, sdpa(q, k, v, causal=causal), atol=2e-5)


# ---------------------------------------------------------------------------------------------------- bad input
def _qkv(**kw):
    return make_qkv(1, kw.pop("hq", 2), kw.pop("hkv", 2), kw.pop("lq", 70), kw.pop("lk", 70), 32, seed=1)


def _all_entry_points(q, k, v):
    """Call every public function on (q, k, v); each must raise ValueError."""
    good_q, good_k, _ = _qkv()
    layout = sa.estimate(good_q, good_k, sa.AShape(sink=8, local=16))
    return [lambda: sa.sparse_prefill(q, k, v, sa.AShape(sink=8, local=16), dense_below=0),
            lambda: sa.sparse_prefill(q, k, v),
            lambda: sa.estimate(q, k, sa.AShape(sink=8, local=16)),
            lambda: sa.sparse_attention(q, k, v, layout),
            lambda: sa.reference_attention(q, k, v),
            lambda: sa.dense_attention(q, k, v)]


def _bad_inputs():
    q, k, v = _qkv()
    cases = {
        "q rank": ((q[0], k, v), r"\bq\b.*4-d"),
        "k rank": ((q, k[..., None], v), r"\bk\b.*4-d"),
        "v rank": ((q, k, v[0, 0]), r"\bv\b.*4-d"),
        "heads not multiple": ((make_qkv(1, 3, 2, 70, 70, 32)), r"q heads \(3\).*multiple.*\(2\)"),
        "lq > lk": ((_qkv(lq=80, lk=70)), r"q seq_len \(80\).*k seq_len \(70\)"),
        "head dim": ((q, k[..., :16], v[..., :16]), r"head_dim"),
        "v head dim": ((q, k, v[..., :16]), r"\bk and v\b"),
        "dtype": ((q, k.half(), v.half()), r"dtype"),
        "int q": ((q.long(), k, v), r"\bq\b.*floating"),
        "int v": ((q, k, v.to(torch.int32)), r"\bv\b.*floating"),
        "bool k": ((q, k.bool(), v), r"\bk\b.*floating"),
        "device": ((q.to("meta"), k, v), r"device"),
        "batch": ((q, torch.cat([k, k]), torch.cat([v, v])), r"batch"),
        "not a tensor": ((q.numpy(), k, v), r"\bq\b.*torch.Tensor"),
    }
    return cases


BAD = _bad_inputs()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_naming_the_argument(case):
    (q, k, v), match = BAD[case]
    calls = _all_entry_points(q, k, v)
    if case.startswith("v ") or case == "int v":
        calls = [c for c in calls if "estimate" not in c.__code__.co_names]     # estimate takes no v
    assert len(calls) >= 5
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("fn", ["sparse_prefill", "estimate"])
@pytest.mark.parametrize("n", [1, 3])
def test_per_head_list_of_wrong_length(fn, n):
    q, k, v = _qkv(hq=2, hkv=1)
    patterns = [sa.AShape(sink=8, local=16)] * n
    call = {"sparse_prefill": lambda: sa.sparse_prefill(q, k, v, patterns, dense_below=0),
            "estimate": lambda: sa.estimate(q, k, patterns)}[fn]
    with pytest.raises(ValueError, match=r"pattern.*\(2\).*got %d" % n):
        call()


@pytest.mark.parametrize("pattern", ["ashape", 3, [sa.AShape(), "dense"], {"0": sa.Dense()}])
def test_pattern_of_the_wrong_type(pattern):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="pattern"):
        sa.estimate(q, k, pattern)
    with pytest.raises(ValueError, match="pattern"):
        sa.sparse_prefill(q, k, v, pattern)


@pytest.mark.parametrize("backend", ["tpu", "Torch", "", None])
def test_unknown_backend(backend):
    q, k, v = _qkv()
    layout = sa.estimate(q, k, sa.AShape(sink=8, local=16))
    with pytest.raises(ValueError, match="backend"):
        sa.sparse_attention(q, k, v, layout, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        sa.sparse_prefill(q, k, v, backend=backend)


@pytest.mark.parametrize("other", [dict(lq=64, lk=70), dict(lq=70, lk=130), dict(hq=4, hkv=2), dict(batch=2)])
def test_layout_for_other_shapes_is_refused(other):
    q, k, v = _qkv()
    other = dict(other)
    if other.pop("batch", None):
        q2, k2, _ = make_qkv(2, 2, 2, 70, 70, 32)
    else:
        q2, k2, _ = _qkv(**other)
    layout = sa.estimate(q2, k2, sa.AShape(sink=8, local=16))
    with pytest.raises(ValueError, match="layout"):
        sa.sparse_attention(q, k, v, layout)


def test_layout_with_other_block_sizes_runs():
    # a layout with block_m=32 has twice the query blocks: it describes the same q/k and must run correctly
    q, k, v = _qkv()
    layout = sa.estimate(q, k, sa.AShape(sink=8, local=16), block_m=32, block_n=16)
    out = sa.sparse_attention(q, k, v, layout)
    assert_close(out, sa.reference_attention(q, k, v, layout.to_mask()))


def test_layout_of_the_wrong_type_is_refused():
    q, k, v = _qkv()
    layout = sa.estimate(q, k, sa.AShape(sink=8, local=16))
    with pytest.raises(TypeError, match="layout"):
        sa.sparse_attention(q, k, v, layout.to_mask())


@pytest.mark.parametrize("scale", [0, -1.0, "0.1", True])
def test_bad_scale(scale):
    q, k, v = _qkv()
    layout = sa.estimate(q, k, sa.AShape(sink=8, local=16))
    with pytest.raises(ValueError, match="scale"):
        sa.sparse_attention(q, k, v, layout, scale=scale)
    with pytest.raises(ValueError, match="scale"):
        sa.sparse_prefill(q, k, v, scale=scale, dense_below=0)


@pytest.mark.parametrize("name,value", [("block_m", 0), ("block_n", -64), ("block_m", 32.0)])
def test_bad_block_sizes(name, value):
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=name):
        sa.estimate(q, k, sa.AShape(sink=8, local=16), **{name: value})


@pytest.mark.parametrize("make,name", [
    (lambda: sa.VerticalSlash(vertical=-1), "vertical"),
    (lambda: sa.VerticalSlash(slash=-1, local=0), "slash"),
    (lambda: sa.AShape(sink=-1), "sink"),
    (lambda: sa.AShape(local=-1), "local"),
    (lambda: sa.BlockSparse(top_k=-1), "top_k"),
    (lambda: sa.VerticalSlash(gamma=0), "gamma"),
    (lambda: sa.VerticalSlash(gamma=1.2), "gamma"),
    (lambda: sa.BlockSparse(gamma=-0.5), "gamma"),
    (lambda: sa.BlockSparse(gamma=2.0), "gamma"),
])
def test_bad_pattern_parameters(make, name):
    with pytest.raises(ValueError, match=name):
        make()
