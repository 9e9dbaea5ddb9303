"""Training through a patched model: the sparse prefill route is differentiated exactly (no silent None gradient).

Kernel level: `differentiable_sparse_attention` against the dense oracle with the layout's mask, output and all
three gradients, on odd shapes.  Model level: with a budget covering every key the patched model's gradients equal
the sdpa model's; with a real budget they equal those of the same model whose sparse kernel is replaced by the
oracle, and the train-mode forward equals the inference forward (the custom op over the fast kernel)."""
from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_attn as sa  # noqa: E402
import sparse_attn.hf as sah  # noqa: E402
from helpers import make_qkv, random_layout  # noqa: E402
from sparse_attn.backends.torch.differentiable import differentiable_sparse_attention  # noqa: E402
from sparse_attn.integrations.hf import attention as hf_attention  # noqa: E402
from sparse_attn.tools.tiny_model import tiny_llama  # noqa: E402

FULL = sa.VerticalSlash(vertical=10**6, slash=10**6)
SPARSE = sa.VerticalSlash(vertical=4, slash=64, sink=2, local=8)
L = 200                                   # not a multiple of the 64-row blocks


def _grads_against_oracle(q, k, v, layout, causal, softcap=0.0):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    out = differentiable_sparse_attention(q, k, v, layout, causal=causal, scale=scale, softcap=softcap)
    ref = sa.reference_attention(q, k, v, layout.to_mask(), causal=causal, scale=scale, softcap=softcap)
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,contiguity", [(2, 4, 2, 113, 113, "contiguous"),
                                                       (1, 3, 1, 50, 130, "strided"),
                                                       (2, 2, 2, 65, 65, "blhd")])
@pytest.mark.parametrize("causal", [True, False])
def test_differentiable_kernel_matches_oracle_on_random_layouts(B, Hq, Hkv, Lq, Lk, contiguity, causal):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D=16, seed=Lq, contiguity=contiguity)
    layout = random_layout(random.Random(Lq), B, Hq, Lq, Lk, 64, 16)[0]
    assert 0 < layout.density(causal) < 0.9
    _grads_against_oracle(q, k, v, layout, causal)


def test_differentiable_kernel_matches_oracle_on_estimated_layouts_and_empty_rows():
    q, k, v = make_qkv(2, 4, 2, 150, 150, D=16, seed=3, structured=True)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=4, slash=16, sink=2, local=8, last_q=16))
    assert layout.density() < 0.9
    _grads_against_oracle(q, k, v, layout, True)
    _grads_against_oracle(q * 8, k, v, layout, True, softcap=2.0)          # Gemma-2's cap, scores well past it
    empty = sa.SparseLayout.from_block_mask(torch.zeros(2, 4, 3, 3, dtype=torch.bool), 150, 150)
    q64 = q.detach().double().requires_grad_()
    out = differentiable_sparse_attention(q64, k.double(), v.double(), empty, scale=0.25)
    (grad,) = torch.autograd.grad(out.sum(), q64)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(grad, torch.zeros_like(grad))


def test_differentiable_kernel_forward_equals_the_fast_kernels():
    q, k, v = make_qkv(2, 4, 2, 113, 113, D=32, seed=5, structured=True)
    layout = sa.estimate(q, k, sa.VerticalSlash(vertical=4, slash=16, sink=2, local=8, last_q=16))
    out = differentiable_sparse_attention(q, k, v, layout, scale=32 ** -0.5)
    for backend in ("auto", "torch"):
        torch.testing.assert_close(out, sa.sparse_attention(q, k, v, layout, backend=backend), rtol=1e-5,
                                   atol=1e-5)


# ------------------------------------------------------------------------------------------------- model level
def _model(**patch_options):
    model = tiny_llama(hidden=64, vocab=128, max_positions=512, init_std=0.2)
    if patch_options:
        sah.patch(model, **patch_options)
    return model.train()


def _batch():
    """Two rows of different content, the second left-padded by 37 tokens."""
    ids = torch.randint(1, 128, (2, L), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    ids[1, :37] = 0
    return ids, mask


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    scored = mask.bool()
    scored[:, 1:] &= mask[:, :-1].bool()         # a label scores the logits of the position before it: both real
    labels = torch.where(scored, ids, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _assert_same_grads(got, want, rtol, atol):
    for name, w in want.items():
        assert got[name] is not None, f"{name}: no gradient"
        torch.testing.assert_close(got[name], w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,padded", [("auto", True), ("torch", False)])
def test_full_budget_gradients_equal_sdpa(backend, padded):
    ids, mask = _batch()
    if not padded:
        mask = torch.ones_like(mask)
    loss_dense, dense = _loss_and_grads(_model(), ids, mask)
    assert dense["model.layers.0.self_attn.q_proj.weight"] is not None
    loss, grads = _loss_and_grads(_model(config=FULL, dense_below=0, dense_above=1.0, backend=backend), ids, mask)
    torch.testing.assert_close(loss, loss_dense, rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads, dense, rtol=1e-3, atol=1e-5)


def test_real_budget_gradients_are_those_of_the_sparse_layout(monkeypatch):
    ids, mask = _batch()
    densities = []
    model = _model(config=SPARSE, dense_below=0, dense_above=1.0, on_layout=lambda i, lay, d: densities.append(d))
    with torch.no_grad():
        inference = model(ids, attention_mask=mask).logits             # the custom op over the fast kernel
    loss, grads = _loss_and_grads(model, ids, mask)
    assert densities and max(densities) < 0.9 and min(densities) < 0.8     # the layouts really are sparse
    _, dense = _loss_and_grads(_model(), ids, mask)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(grads[q_proj], dense[q_proj], rtol=1e-2, atol=1e-4)    # not the dense gradient

    def oracle(q, k, v, layout, *, causal, scale, softcap=0.0):
        return sa.reference_attention(q, k, v, layout.to_mask(), causal=causal, scale=scale, softcap=softcap)

    monkeypatch.setattr(hf_attention, "differentiable_sparse_attention", oracle)
    loss_oracle, want = _loss_and_grads(model, ids, mask)
    torch.testing.assert_close(loss, loss_oracle, rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads, want, rtol=1e-3, atol=1e-6)
    monkeypatch.undo()
    train_logits = model(ids, attention_mask=mask).logits.detach()
    keep = mask.bool()
    torch.testing.assert_close(train_logits[keep], inference[keep], rtol=1e-4, atol=1e-5)


def test_inference_under_train_mode_takes_the_custom_op(monkeypatch):
    calls = []
    monkeypatch.setattr(hf_attention, "differentiable_sparse_attention",
                        lambda *a, **kw: calls.append(1) or differentiable_sparse_attention(*a, **kw))
    model = _model(config=SPARSE, dense_below=0, dense_above=1.0)
    ids, mask = _batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert calls == []
    model(ids, attention_mask=mask).logits.sum().backward()
    assert len(calls) == 2 * 2                                           # 2 layers x 2 rows of a padded batch


def test_dropout_in_training_is_refused():
    model = _model(config=SPARSE, dense_below=0)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention dropout"):
        model(torch.randint(1, 128, (1, 70)))
