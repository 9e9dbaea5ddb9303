"""The default `Auto` pattern: it keeps the promised mass on every head of a workload made to fool sample-based
estimators (where the old default does not), its mixed per-head layouts run exactly like any layout, the
antidiagonal block scores tell blocks apart, and `sparse_prefill`'s dense guard."""
import pytest
import torch

import sparse_attn as sa
from helpers import assert_close, causal_mask, make_qkv
from sparse_attn.tools.audit import optimum_density
from sparse_attn.dense_guard import sparse_is_slower
from sparse_attn.tools.metrics import attention_recall_per_head
from sparse_attn.estimators.sample_mass import antidiagonal_block_mass
from sparse_attn.patterns.auto import BLOCK_SPARSE, DENSE, VERTICAL_SLASH, VERTICAL_SLASH_WIDE, choose_per_head
from sparse_attn.tools.synthetic import HardWorkload, make_hard_qkv

HARD = HardWorkload(seq_len=4096, head_dim=64, doc_min=256, doc_max=768, period=331)


@pytest.fixture(scope="module")
def hard():
    q, k, v = make_hard_qkv(HARD)
    return q, k, v


def test_auto_keeps_gamma_on_every_head_where_the_old_default_does_not(hard):
    q, k, _ = hard
    auto, old = sa.estimate(q, k, sa.Auto(gamma=0.95)), sa.estimate(q, k, sa.VerticalSlash(gamma=0.95))
    kept = attention_recall_per_head(q, k, [auto, old])                                # [2, Hq]
    assert kept[0].mean() >= 0.95 and kept[0].min() >= 0.93, kept[0]
    assert kept[1].min() < 0.93, "the workload should defeat the sample-only vertical-slash estimate"
    assert auto.density() < 0.5


def test_auto_choices_follow_the_head_kinds(hard):
    q, k, _ = hard
    choice = choose_per_head(q, k, sa.Auto())[0].tolist()
    kinds = [HARD.kinds[h % len(HARD.kinds)] for h in range(q.shape[1])]
    for kind, c in zip(kinds, choice):
        if kind in ("sink", "far_needle", "periodic"):
            assert c in (VERTICAL_SLASH, VERTICAL_SLASH_WIDE), (kind, c)
        if kind == "document":
            assert c == BLOCK_SPARSE, (kind, c)
        if kind == "diffuse":
            assert c == DENSE, (kind, c)


@pytest.mark.parametrize("lq,lk,hq,hkv", [(1000, 1000, 4, 2), (300, 1100, 4, 1), (1, 700, 2, 2), (113, 113, 3, 3)])
def test_auto_layout_runs_like_any_layout(lq, lk, hq, hkv):
    # batch 2 with different content, non-contiguous inputs; the mixed layout against the oracle
    q, k, v = make_qkv(2, hq, hkv, lq, lk, 64, seed=lq + lk, contiguity="blhd", structured=True)
    p = sa.Auto(check_rows=8, need_rows=8, last_q=32)
    layout = sa.estimate(q, k, p).check()
    assert (layout.batch, layout.heads, layout.q_len, layout.k_len) == (2, hq, lq, lk)
    out = sa.sparse_attention(q, k, v, layout, backend="torch")
    ref = sa.reference_attention(q, k, v, layout.to_mask() & causal_mask(lq, lk))
    assert_close(out, ref, atol=2e-5)


def test_auto_decides_per_batch_row():
    # row 0: the hard workload's heads; row 1: the same keys with every query head diffuse -> dense everywhere
    q, k, _ = make_hard_qkv(HARD)
    qd, kd, _ = make_hard_qkv(HardWorkload(**{**HARD.__dict__, "kinds": ("diffuse",)}))
    q2, k2 = torch.cat([q, qd]), torch.cat([k, kd])
    choice = choose_per_head(q2, k2, sa.Auto())
    assert (choice[1] == DENSE).all()
    assert (choice[0] != DENSE).any()
    both = sa.estimate(q2, k2, sa.Auto())
    alone = sa.estimate(q, k, sa.Auto())
    assert torch.equal(both.to_mask()[:1], alone.to_mask())


def test_auto_rejects_bad_settings():
    with pytest.raises(ValueError, match="dense_share"):
        sa.Auto(dense_share=0)
    with pytest.raises(ValueError, match="gamma"):
        sa.Auto(gamma=1.5)


def test_antidiagonal_block_mass_is_a_distribution_per_query_block():
    q, k, _ = make_qkv(2, 4, 2, 300, 500, 32, seed=3)
    mass = antidiagonal_block_mass(q, k, 64, 64, 32 ** -0.5, slice(0, None), 16, True)
    assert mass.shape == (2, 4, 5, 8)
    assert_close(mass.sum(-1), torch.ones(2, 4, 5), atol=1e-5)
    # causal: no mass on key blocks that start after the query block's last position (bottom-right aligned)
    last = torch.arange(5) * 64 + 63
    last = last.clamp(max=299) + 200
    assert (mass[..., torch.arange(8)[None, :] * 64 > last[:, None]] == 0).all()


def test_antidiagonal_scores_tell_document_blocks_apart(hard):
    # document heads: mean-pooled block scores miss gamma, antidiagonal ones reach it at a similar density
    q, k, _ = hard
    heads = [h for h in range(q.shape[1]) if HARD.kinds[h % len(HARD.kinds)] == "document"]
    anti = sa.estimate(q, k, sa.BlockSparse(gamma=0.95, scoring="antidiagonal"))
    mean = sa.estimate(q, k, sa.BlockSparse(gamma=0.95, scoring="mean"))
    kept = attention_recall_per_head(q, k, [anti, mean])[:, heads]
    assert (kept[0] >= 0.95).all() and (kept[1] < 0.93).all(), kept
    assert anti.density() <= 1.2 * mean.density()


def test_optimum_density_counts_the_fewest_keys():
    # one dominant key per row: the optimum for gamma 0.5 is one key per row
    L = 256
    q = torch.zeros(1, 1, L, 32)
    k = torch.zeros(1, 1, L, 32)
    q[..., 0] = 10.0
    k[0, 0, 0, 0] = 10.0                                     # the sink holds ~all mass of every row
    opt = optimum_density(q, k, 0.5, rows=L)
    assert_close(opt, torch.tensor([L / (L * (L + 1) / 2)]), atol=1e-6)


def test_guard_sends_dense_layouts_to_sdpa_only_from_backends_dearer_per_key():
    q, k, v = make_qkv(1, 2, 1, 4096, 4096, 32, seed=1)
    dense_layout = sa.estimate(q, k, sa.Dense())
    sparse_layout = sa.estimate(q, k, sa.AShape(sink=4, local=64))
    assert sparse_is_slower(dense_layout, "torch") and not sparse_is_slower(sparse_layout, "torch")
    # the compiled CPU kernel computes every key cheaper than SDPA: no layout goes back to SDPA from it
    assert not sparse_is_slower(dense_layout, "cpu")
    # random inputs: every head diffuse, Auto picks dense heads, the guard runs SDPA (bitwise its result)
    out = sa.sparse_prefill(q, k, v, sa.Auto(check_rows=4, need_rows=4, last_q=16), dense_below=0, backend="torch")
    assert torch.equal(out, sa.dense_attention(q, k, v))


def test_auto_round_trips_through_a_config(tmp_path):
    from sparse_attn.config import SparseConfig

    cfg = SparseConfig(num_layers=1, num_heads=2, layers=[[sa.Auto(gamma=0.9, dense_share=0.4), sa.VerticalSlash()]])
    cfg.save(tmp_path / "c.json")
    assert SparseConfig.load(tmp_path / "c.json").layers == cfg.layers
