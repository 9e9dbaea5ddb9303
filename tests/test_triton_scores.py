"""Estimator score kernels (`estimators.triton_scores_kernel`): column / diagonal mass of the last-query sample against the torch
reference (`last_query_probs` + `column_mass` / `diagonal_mass`) on awkward shapes; the VerticalSlash layout with
the triton scores equals the torch-scores layout; the static slot widths of the GPU path give the same layouts;
bad input.  Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 first).
The `gpu`-marked test proves the estimate makes no host synchronisation (CUDA sync debug mode)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_attn as sa
from sparse_attn.backends.triton import launcher as triton_launch
from sparse_attn.estimators.sample_mass import column_mass, diagonal_mass, last_query_probs
from sparse_attn.patterns import base, block_sparse, vertical_slash
from sparse_attn.tools.synthetic import Workload
from sparse_attn.tools.synthetic import make_qkv as make_workload
from helpers import make_qkv

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_launch.interpreter_enabled():
    pytest.skip("no GPU and TRITON_INTERPRET is off", allow_module_level=True)

from sparse_attn.estimators.triton_scores import triton_sample_scores  # noqa: E402

F32, F16 = torch.float32, torch.float16
# B, Hq, Hkv, Lq, Lk, D, last_q, causal, contiguity, heads (None: all), options: awkward lengths (1, 63, 65, 113,
# 1000), Lq < Lk, last_q > Lq, MHA / GQA / MQA, head subsets out of order, non-contiguous inputs, several row
# blocks (block_n 16 < last_q), several stats chunks, the per-element atomic path.
CASES = {
    "L1": (2, 2, 2, 1, 1, 64, 64, True, "contiguous", None, {}),
    "L63_gqa_d80": (2, 4, 2, 63, 63, 80, 64, True, "blhd", None, {}),
    "q65k113_mqa_d128": (2, 4, 1, 65, 113, 128, 64, True, "strided", [3, 0], {}),
    "q30k1000_lastq_gt_lq": (2, 2, 1, 30, 1000, 64, 64, True, "contiguous", None, dict(stats_chunk=256)),
    "q113k113_noncausal": (2, 3, 3, 113, 113, 64, 100, False, "contiguous", None, dict(block_n=32, stats_chunk=32)),
    "q65k200_atomics": (2, 4, 2, 65, 200, 80, 48, True, "contiguous", [1, 2], dict(use_gather=False)),
    "q20k65_noncausal_rows": (2, 2, 1, 20, 65, 128, 64, False, "blhd", None, dict(block_n=16, use_gather=False)),
}
PARAMS = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}") for name in CASES for dtype in (F32, F16)]


def reference(q, k, last_q, causal, heads, sink, local):
    """Column mass, column mass off the local band and diagonal mass off the sink columns, from the dense
    sample probabilities (fp32)."""
    probs, pos = last_query_probs(q.float(), k.float(), last_q, q.shape[-1] ** -0.5, causal)
    probs = probs[:, heads]
    keys = torch.arange(k.shape[2])
    dist = pos[:, None] - keys                                                          # [n, Lk]
    near = (dist >= 0) & (dist < local[:, None, None])                                  # [Hs, n, Lk]
    off_sink = (keys >= sink[:, None])[:, None, :]                                      # [Hs, 1, Lk]
    return column_mass(probs), column_mass(probs * ~near), diagonal_mass(probs * off_sink, pos)


@pytest.mark.parametrize("name,dtype", PARAMS)
def test_sample_scores_match_torch_reference(name, dtype):
    B, Hq, Hkv, Lq, Lk, D, last_q, causal, contiguity, heads, options = CASES[name]
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, seed=Lk + D, contiguity=contiguity)
    heads = torch.arange(Hq) if heads is None else torch.tensor(heads)
    gen = torch.Generator().manual_seed(Lk)
    sink = torch.randint(0, max(2, Lk // 3), (len(heads),), generator=gen)
    local = torch.randint(0, max(2, min(Lq, last_q) + 8), (len(heads),), generator=gen)
    dev = lambda t: t.to(DEVICE)                                                        # noqa: E731
    got = triton_sample_scores(dev(q), dev(k), last_q, D ** -0.5, causal, heads=dev(heads), sink=dev(sink),
                               local=dev(local), **options)
    col, col_off, diag = reference(q, k, last_q, causal, heads, sink, local)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == F32 else dict(atol=1e-3, rtol=2e-3)   # fp16 logits vs fp32 ones
    n = min(last_q, Lq)
    for what, a, e in (("column", got.column, col), ("column_off_local", got.column_off_local, col_off),
                       ("diagonal", got.diagonal, diag)):
        assert a.shape == (B, len(heads), Lk) and a.dtype == torch.float32, what
        torch.testing.assert_close(a.cpu(), e, **tol, msg=lambda m: f"{what}: {m}")
    # Every sample row's mass is 1: the two passes agree on the normaliser.
    torch.testing.assert_close(got.column.sum(-1).cpu(), torch.full((B, len(heads)), float(n)), atol=1e-4,
                               rtol=1e-4)


@settings(max_examples=10)
@given(st.data())
def test_sample_scores_property(data):
    """Random small shapes, sample sizes, bands, head subsets and kernel options: masses equal the reference."""
    B, Hkv, g = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    Lk = data.draw(st.integers(1, 150))
    Lq, last_q = data.draw(st.integers(1, Lk)), data.draw(st.integers(1, 80))
    D, causal = data.draw(st.sampled_from([16, 24, 64, 80])), data.draw(st.booleans())
    heads = data.draw(st.lists(st.integers(0, Hkv * g - 1), min_size=1, max_size=3, unique=True))
    sink = torch.tensor(data.draw(st.lists(st.integers(0, Lk + 2), min_size=len(heads), max_size=len(heads))))
    local = torch.tensor(data.draw(st.lists(st.integers(0, 100), min_size=len(heads), max_size=len(heads))))
    options = dict(block_n=data.draw(st.sampled_from([16, 32, 64])), use_gather=data.draw(st.booleans()),
                   stats_chunk=data.draw(st.integers(1, 200)))
    q, k, _ = make_qkv(B, Hkv * g, Hkv, Lq, Lk, D, seed=Lk * 7 + Lq)
    got = triton_sample_scores(q.to(DEVICE), k.to(DEVICE), last_q, D ** -0.5, causal,
                               heads=torch.tensor(heads).to(DEVICE), sink=sink.to(DEVICE), local=local.to(DEVICE),
                               **options)
    expected = reference(q, k, last_q, causal, torch.tensor(heads), sink, local)
    for a, e in zip((got.column, got.column_off_local, got.diagonal), expected):
        torch.testing.assert_close(a.cpu(), e, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_mass_on_chosen_diagonals_matches_torch(causal):
    B, Hq, Hkv, Lq, Lk, D, group = 2, 4, 2, 50, 130, 64, 16
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=7)
    n_groups = -(-Lk // group)
    picked = torch.rand(B, Hq, n_groups + 1, generator=torch.Generator().manual_seed(3)) < 0.4
    picked[..., -1] = False
    got = triton_sample_scores(q.to(DEVICE), k.to(DEVICE), 64, D ** -0.5, causal).on_diagonals(picked.to(DEVICE),
                                                                                                group)
    probs, pos = last_query_probs(q, k, 64, D ** -0.5, causal)
    dist = pos[:, None] - torch.arange(Lk)
    group_of = torch.where(dist >= 0, dist // group, n_groups)
    torch.testing.assert_close(got.cpu(), column_mass(probs * picked[:, :, group_of]), atol=2e-5, rtol=1e-4)


VS_PATTERNS = {
    "topk": sa.VerticalSlash(vertical=48, slash=192, sink=8, local=64),
    "gamma": sa.VerticalSlash(vertical=64, slash=256, gamma=0.9, sink=8, local=64, min_vertical=8, min_slash=64),
    "per_head": [sa.VerticalSlash(vertical=48, slash=192, sink=8, local=64, last_q=48),
                 sa.VerticalSlash(vertical=16, slash=320, sink=0, local=128, last_q=48, gamma=0.8)],
}


def vs_layout(q, k, patterns, heads, backend, causal=True):
    return vertical_slash.VerticalSlash.build(patterns, heads, q, k, causal=causal, scale=q.shape[-1] ** -0.5,
                                              block_m=64, block_n=64, scores_backend=backend)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("kind", list(VS_PATTERNS))
def test_vertical_slash_layout_same_with_triton_scores(kind, dtype):
    """Synthetic workload (sinks, needles, periodic diagonals), batch 2, GQA, Lq < Lk: identical layouts."""
    Lk = 700
    q, k, _ = make_workload(Workload(batch=2, q_heads=4, kv_heads=2, seq_len=Lk, head_dim=64, q_len=200,
                                     period=97, seed=11, dtype=dtype))
    pattern = VS_PATTERNS[kind]
    heads = torch.tensor([0, 3, 1]) if isinstance(pattern, list) else torch.arange(4)
    patterns = [pattern[i % len(pattern)] for i in range(len(heads))] if isinstance(pattern, list) else \
        [pattern] * len(heads)
    ref = vs_layout(q, k, patterns, heads, "torch")
    got = vs_layout(q.to(DEVICE), k.to(DEVICE), patterns, heads.to(DEVICE), "triton").to("cpu")
    assert 0 < ref.density() < 0.9
    if DEVICE == "cpu":
        for field in ("block_count", "block_offset", "column_count", "column_index"):
            assert torch.equal(getattr(got, field), getattr(ref, field)), field
    else:                                    # a GPU keeps the static slot widths: same entries, wider padding
        assert torch.equal(got.to_mask(), ref.to_mask())


@settings(max_examples=6)
@given(st.data())
def test_vertical_slash_layout_property(data):
    """Random per-head budgets (gamma or not), bands, lengths and head configs: the same layout (as masks) with
    either score backend."""
    Lk = data.draw(st.integers(1, 300))
    Lq, Hkv, g = data.draw(st.integers(1, Lk)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    last_q, causal = data.draw(st.integers(1, 100)), data.draw(st.booleans())

    @st.composite
    def pattern(draw):
        v, s = draw(st.integers(0, 300)), draw(st.integers(0, 400))
        return sa.VerticalSlash(vertical=v, slash=s, sink=draw(st.integers(0, v)), local=draw(st.integers(0, s)),
                                last_q=last_q, gamma=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
                                min_vertical=draw(st.integers(0, v)), min_slash=draw(st.integers(0, s)))

    patterns = data.draw(st.lists(pattern(), min_size=Hkv * g, max_size=Hkv * g))
    q, k, _ = make_qkv(2, Hkv * g, Hkv, Lq, Lk, 64, seed=Lk + Lq, structured=data.draw(st.booleans()))
    heads = torch.arange(Hkv * g)
    ref = vs_layout(q, k, patterns, heads, "torch", causal)
    got = vs_layout(q.to(DEVICE), k.to(DEVICE), patterns, heads.to(DEVICE), "triton", causal).to("cpu")
    assert torch.equal(got.to_mask(), ref.to_mask())


def test_static_slot_widths_of_the_gpu_path_give_the_same_layouts(monkeypatch):
    """On a GPU the estimators skip cutting the slots to the fullest head (a host sync): same masks."""
    q, k, _ = make_qkv(2, 4, 2, 150, 400, 64, seed=5, structured=True)
    patterns = [sa.VerticalSlash(vertical=24, slash=128, sink=4, local=64),
                sa.VerticalSlash(vertical=200, slash=320, gamma=0.6, sink=4, local=64, last_q=32, min_vertical=4,
                                 min_slash=64),                  # uses fewer slots than its budget
                sa.BlockSparse(top_k=3), sa.BlockSparse(gamma=0.8)]
    compact = {name: sa.estimate(q, k, p) for name, p in zip("abcd", patterns)}
    for module in (vertical_slash, block_sparse):
        monkeypatch.setattr(module, "compacts_slots", lambda device: False)
    wider = 0
    for name, p in zip("abcd", patterns):
        static = sa.estimate(q, k, p)
        widths = [(getattr(static, f).shape[-1], getattr(compact[name], f).shape[-1])
                  for f in ("block_offset", "column_index")]
        assert all(s >= c for s, c in widths)
        wider += any(s > c for s, c in widths)
        assert torch.equal(static.to_mask(), compact[name].to_mask()), name
    assert wider >= 2                                    # the static widths were really wider somewhere
    assert base.compacts_slots("cpu") and not base.compacts_slots("cuda")


def test_bad_input_is_rejected_with_the_reason():
    q, k, _ = make_qkv(1, 4, 2, 16, 32, 64)
    q, k = q.to(DEVICE), k.to(DEVICE)
    cases = [
        (dict(q=q, k=k, last_q=0), "last_q must be an int >= 1"),
        (dict(q=q[..., :20], k=k[..., :20], last_q=8), "head_dim must be a multiple of 8"),
        (dict(q=q, k=k[:, :, :8], last_q=8), "must be <= k seq_len"),
        (dict(q=q, k=k.half(), last_q=8), "share a dtype"),
        (dict(q=q, k=k, last_q=8, heads=torch.tensor([0.5], device=DEVICE)), "heads must be a 1-d int"),
        (dict(q=q, k=k, last_q=8, sink=torch.zeros(3, dtype=torch.long, device=DEVICE)), "sink and local must"),
        (dict(q=q, k=k, last_q=8, block_n=24), "block_n must be a power of two"),
    ]
    if DEVICE == "cpu":
        cases.append((dict(q=q, k=k, last_q=8, heads=torch.tensor([0, 4])), "heads must index the 4 query heads"))
    if DEVICE == "cpu":
        cases.append((dict(q=q.bfloat16(), k=k.bfloat16(), last_q=8), "bfloat16 cannot be checked"))
    for kwargs, reason in cases:
        args = {"scale": 0.125, **kwargs}
        with pytest.raises(ValueError, match=reason):
            triton_sample_scores(args.pop("q"), args.pop("k"), args.pop("last_q"), args.pop("scale"), **args)
    with pytest.raises(ValueError, match="must be 'auto' or one of"):
        vs_layout(q, k, [sa.VerticalSlash()] * 4, torch.arange(4, device=DEVICE), "cupy")
    scores = triton_sample_scores(q, k, 8, 0.125)
    with pytest.raises(ValueError, match="picked must be"):
        scores.on_diagonals(torch.zeros(1, 3, 2, dtype=torch.bool, device=DEVICE), 64)


@pytest.mark.gpu
def test_estimate_makes_no_host_sync_on_gpu():
    """VerticalSlash (top-k and gamma) and BlockSparse(top_k) estimates under CUDA's sync debug mode "error": any
    host synchronisation raises."""
    q, k, _ = make_workload(Workload(batch=1, q_heads=8, kv_heads=2, seq_len=4096, head_dim=128,
                                     dtype=torch.bfloat16), "cuda")
    patterns = [sa.VerticalSlash(vertical=500, slash=2048), sa.VerticalSlash(gamma=0.95), sa.BlockSparse(top_k=16),
                [sa.VerticalSlash(vertical=100, slash=512), sa.VerticalSlash(vertical=300, slash=1024)] * 4]
    warm = [sa.estimate(q, k, p) for p in patterns]                      # compiles the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layouts = [sa.estimate(q, k, p) for p in patterns]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, ref in zip(layouts, warm):
        assert torch.equal(got.to_mask(), ref.to_mask())


def _count_host_syncs(fn):
    """``fn()``'s result and the number of host synchronisations it made (CUDA sync debug mode "warn")."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
def test_default_pattern_syncs_a_few_times_per_call_not_per_head():
    """The default `Auto` decides which heads need which estimate on the host (documented): a few syncs per call,
    not one per head (32 query heads make no more than 16)."""
    counts = []
    for q_heads in (8, 32):
        q, k, _ = make_workload(Workload(batch=1, q_heads=q_heads, kv_heads=q_heads // 4, seq_len=4096,
                                         head_dim=128, dtype=torch.bfloat16), "cuda")
        sa.estimate(q, k)                                                # warm: compiles outside the count
        counts.append(_count_host_syncs(lambda: sa.estimate(q, k))[1])
    assert 1 <= min(counts) and max(counts) <= 16, counts


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
def test_sample_scores_bf16_on_gpu(D):
    """bf16 (the interpreter's tl.dot is wrong for it): masses within bf16 logit error of the fp32 reference."""
    q, k, _ = make_qkv(2, 8, 2, 300, 1000, D, dtype=torch.bfloat16, seed=D)
    heads, sink, local = torch.tensor([5, 0, 3]), torch.tensor([4, 0, 64]), torch.tensor([64, 16, 0])
    got = triton_sample_scores(q.cuda(), k.cuda(), 64, D ** -0.5, heads=heads.cuda(), sink=sink.cuda(),
                               local=local.cuda())
    for a, e in zip((got.column, got.column_off_local, got.diagonal),
                    reference(q, k, 64, True, heads, sink, local)):
        torch.testing.assert_close(a.cpu(), e, atol=2e-3, rtol=1e-2)
