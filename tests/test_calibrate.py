"""Calibration: per-head recall against independent dense references, the choice rule, the capture leaving the model
as it was, and the command line end to end on a tiny random-weight Llama."""
import json

import pytest
import torch

from sparse_attn import (AShape, BlockSparse, Dense, Grid, ModalitySpans, QBoundary, TwoDBoundary, VerticalSlash,
                         estimate)
from sparse_attn.tools.calibrate import calibrate_model, calibrate_qk, choose, kernel_cost
from sparse_attn.tools.calibrate_candidates import default_candidates, parse_candidates, parse_modality
from sparse_attn.tools.calibrate_capture import CAPTURE_NAME, capture_attention
from sparse_attn.tools.calibrate_cli import main
from sparse_attn.tools.tiny_model import tiny_llama
from sparse_attn.config import SparseConfig
from sparse_attn.tools.metrics import attention_recall, attention_recall_per_head

from helpers import make_qkv

BLOCK = 16
CANDIDATES = [VerticalSlash(vertical=32, slash=64, sink=16, local=16), VerticalSlash(vertical=64, slash=128, sink=16,
              local=16), AShape(sink=16, local=64), AShape(sink=16, local=128), BlockSparse(top_k=4),
              BlockSparse(top_k=8)]
L = 300


def dense_probs(q, k, scale=None):
    """Independent fp64 softmax(q k^T) with the bottom-right causal mask: [B, Hq, Lq, Lk]."""
    B, Hq, Lq, D = q.shape
    g = Hq // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    logits = q.double() @ kk.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    pos = torch.arange(Lq) + k.shape[2] - Lq
    logits = logits.masked_fill(torch.arange(k.shape[2]) > pos[:, None], float("-inf"))
    return logits.softmax(-1)


def mask_recall(probs, layout):
    """Per head, mean over batch and rows of the mass inside the layout's mask: [H]."""
    return (probs * layout.to_mask()).sum(-1).mean((0, 2))


def mask_cost(layout):
    """Per head kernel work from the mask: each query block computes its listed keys up to its last visible key,
    for all its rows; over the same for dense.  [H], mean over the batch."""
    bm, Lq, Lk = layout.block_m, layout.q_len, layout.k_len
    per_block = layout.to_mask()[:, :, ::bm]                                         # every row of a block alike
    first = torch.arange(per_block.shape[2]) * bm
    rows = (first + bm).clamp(max=Lq) - first
    limit = (first + rows - 1) + Lk - Lq                                             # last visible key
    visible = torch.arange(Lk) <= limit[:, None]
    work = ((per_block & visible).sum(-1) * rows).sum(-1).double()
    return (work / (visible.sum(-1) * rows).sum()).mean(0)


# ---------------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk", [(2, 4, 2, 113, 113), (1, 3, 1, 65, 65), (2, 2, 2, 63, 200),
                                                (1, 4, 4, 1, 65)])
def test_recall_per_head_matches_dense_reference(B, Hq, Hkv, Lq, Lk):
    q, k, _ = make_qkv(B, Hq, Hkv, Lq, Lk, D=32, seed=Lq, structured=True)
    layouts = [estimate(q, k, p, block_m=BLOCK, block_n=BLOCK) for p in CANDIDATES[:1] + CANDIDATES[2:5]]
    got = attention_recall_per_head(q, k, layouts, max_bytes=1)                     # one query block per chunk
    probs = dense_probs(q, k)
    for i, lay in enumerate(layouts):
        torch.testing.assert_close(got[i].double(), mask_recall(probs, lay), atol=2e-5, rtol=0)
        assert abs(float(got[i].mean()) - attention_recall(q, k, lay)) < 2e-5
        torch.testing.assert_close(kernel_cost(lay).double(), mask_cost(lay), atol=1e-6, rtol=0)
    assert torch.equal(attention_recall_per_head(q, k, layouts), got) or \
        torch.allclose(attention_recall_per_head(q, k, layouts), got, atol=1e-6)


def test_recall_per_head_rejects_mixed_layouts():
    q, k, _ = make_qkv(1, 2, 2, 100, D=32)
    a = estimate(q, k, AShape(sink=16, local=32), block_m=16, block_n=16)
    b = estimate(q, k, AShape(sink=16, local=32), block_m=32, block_n=16)
    with pytest.raises(ValueError, match="block_m"):
        attention_recall_per_head(q, k, [a, b])


# ---------------------------------------------------------------------------------------------------- choice
def test_choose_cheapest_reaching_target_else_best():
    recall = torch.tensor([[0.96, 0.90, 0.99, 0.80],
                           [0.97, 0.95, 0.93, 0.85],
                           [1.00, 1.00, 1.00, 0.86]])
    cost = torch.tensor([[0.30, 0.10, 0.50, 0.10],
                         [0.30, 0.20, 0.20, 0.20],
                         [1.00, 1.00, 1.00, 0.90]])
    # head 0: tie on cost -> higher recall; head 1: only row 1 and 2 reach; head 2: row 0 is the only cheap one
    # reaching; head 3: none reaches -> highest recall
    assert choose(recall, cost, 0.95).tolist() == [1, 1, 0, 2]
    assert choose(recall, cost, 0.5).tolist() == [1, 0, 1, 0]


def test_candidates_parse_and_defaults():
    assert parse_candidates("vs:256:512, ashape:64:1024,bs:8,dense") == [
        VerticalSlash(vertical=256, slash=512), AShape(sink=64, local=1024), BlockSparse(top_k=8), Dense()]
    assert parse_candidates("vs:32:48") == [VerticalSlash(vertical=32, slash=48, sink=32, local=48)]
    for bad, msg in (("vs:1", "must be vs:VERTICAL:SLASH"), ("tri:1:2", "unknown pattern"), ("", "no pattern"),
                     ("bs:-3", "non-negative")):
        with pytest.raises(ValueError, match=msg):
            parse_candidates(bad)
    cands = default_candidates(65536)
    assert len(cands) == 10 and len(set(cands)) == 10
    assert VerticalSlash(vertical=1024, slash=2048) in cands and BlockSparse(top_k=256) in cands
    assert len(set(default_candidates(200))) == len(default_candidates(200))       # small L: duplicates removed


# ---------------------------------------------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=256, seed=1)
    ids = torch.randint(0, 256, (2, L), generator=torch.Generator().manual_seed(3))   # batch 2, different rows
    return model, ids


def recorded_qk(model, ids):
    """Each layer's (q, k, scaling) through the capture, plus the eager attention probabilities (independent)."""
    layers = {}
    with capture_attention(model, lambda i, q, k, s: layers.__setitem__(i, (q.clone(), k.clone(), s))), \
            torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(input_ids=ids, use_cache=False, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    return [layers[i] for i in range(len(layers))], probs


@pytest.mark.parametrize("target, fallback", [(0.75, "dense"), (0.9, "best")])
def test_calibrate_model_chooses_cheapest_reaching_target(tiny, target, fallback, tmp_path):
    model, ids = tiny
    result = calibrate_model(model, ids, CANDIDATES, target=target, fallback=fallback, block_m=BLOCK,
                             block_n=BLOCK, progress=False)
    cfg = result.config
    assert (cfg.num_layers, cfg.num_heads, cfg.reference_length) == (2, 4, L)
    cfg.save(tmp_path / "c.json")
    back = SparseConfig.load(tmp_path / "c.json")
    back.check_model(2, 4)
    assert back.layers == cfg.layers

    layers, eager_probs = recorded_qk(model, ids)
    candidates = result.candidates
    assert (Dense() in candidates) == (fallback == "dense")
    n_sparse_chosen = 0
    for i, (q, k, scale) in enumerate(layers):
        probs = eager_probs[i].double()                         # from eager attention: independent of the capture
        torch.testing.assert_close(probs, dense_probs(q, k, scale), atol=1e-5, rtol=0)
        indep_recall = torch.stack([torch.ones(4, dtype=torch.float64) if isinstance(c, Dense) else
                                    mask_recall(probs, estimate(q, k, c, scale=scale, block_m=BLOCK, block_n=BLOCK))
                                    for c in candidates])                          # [C, H]
        torch.testing.assert_close(result.recall[i].double(), indep_recall, atol=1e-4, rtol=0)
        heads = cfg.patterns_for_layer(i, L) or [Dense()] * 4
        for h in range(4):
            chosen = candidates.index(heads[h])
            reach = indep_recall[:, h] >= target
            if reach.any():
                assert indep_recall[chosen, h] >= target - 1e-4
                cheapest = result.cost[i][reach, h].min()
                assert result.cost[i][chosen, h] <= cheapest + 1e-6
            else:
                assert fallback == "best" and chosen == int(indep_recall[:, h].argmax())
            n_sparse_chosen += not isinstance(heads[h], Dense)
            assert abs(cfg.scores[i][h] - float(indep_recall[chosen, h])) < 1e-4 if cfg.layers[i] else True
    assert n_sparse_chosen > 0                                  # the test exercises real choices, not all-dense
    assert "density" in result.summary() and "all" in result.summary()


def test_capture_restores_implementation_even_on_error(tiny):
    model, ids = tiny
    with torch.no_grad():
        before = model(input_ids=ids[:, :40]).logits
    model.set_attn_implementation("eager")

    def boom(i, q, k, s):
        raise RuntimeError("scorer failed")

    with pytest.raises(RuntimeError, match="scorer failed"), torch.no_grad():
        with capture_attention(model, boom):
            model(input_ids=ids[:, :40])
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation(CAPTURE_NAME)        # still registered, but outside a block it only runs SDPA
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids[:, :40]).logits, before, atol=1e-5)
    model.set_attn_implementation("sdpa")
    calibrate_model(model, ids[:, :100], CANDIDATES[:1], block_m=BLOCK, block_n=BLOCK, progress=False)
    assert model.config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids[:, :40]).logits, before)


def test_calibrate_rejects_bad_inputs(tiny):
    model, ids = tiny
    with pytest.raises(ValueError, match="input_ids"):
        calibrate_model(model, ids.float(), CANDIDATES, progress=False)
    with pytest.raises(ValueError, match="target"):
        calibrate_model(model, ids, CANDIDATES, target=1.5, progress=False)
    with pytest.raises(ValueError, match="fallback"):
        calibrate_model(model, ids, CANDIDATES, fallback="none", progress=False)
    with pytest.raises(ValueError, match="not a transformers model"):
        with capture_attention(torch.nn.Linear(2, 2), lambda *a: None):
            pass


def test_calibrate_qk_synthetic_picks_sparse_heads():
    from sparse_attn.tools.synthetic import Workload, make_qkv as synthetic_qkv
    q, k, _ = synthetic_qkv(Workload(q_heads=4, kv_heads=2, seq_len=1024, head_dim=64))
    result = calibrate_qk([(q, k)], target=0.9, progress=False)
    assert result.config.num_layers == 1 and result.config.num_heads == 4
    assert (result.chosen_recall >= 0.9).all() and (result.chosen_cost < 1).any()


# ---------------------------------------------------------------------------------------------------- command line
def test_cli_tiny_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "cfg.json", tmp_path / "plot.png"
    rc = main(["--tiny", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--seq-len", "256", "--block-size",
               str(BLOCK), "--candidates", "vs:32:64,ashape:16:64,bs:4", "--target", "0.7", "-o", str(out),
               "--plot", str(png), "--no-progress"])
    assert rc == 0
    cfg = SparseConfig.load(out)
    cfg.check_model(2, 4)
    assert cfg.reference_length == 256
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "vertical_slash" in printed and "written to" in printed


def test_cli_saved_model_dir_token_ids_minference(tmp_path, tiny):
    model, ids = tiny
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "ids.json").write_text(json.dumps(ids[0, :200].tolist()))
    out = tmp_path / "minf.json"
    rc = main(["--model", str(tmp_path / "model"), "--token-ids", str(tmp_path / "ids.json"), "--block-size",
               str(BLOCK), "--candidates", "vs:32:64,ashape:16:64", "--format", "minference", "-o", str(out),
               "--no-progress", "--target", "0.7"])
    assert rc == 0
    raw = json.loads(out.read_text())
    assert isinstance(raw, list) and len(raw) == 2 and sorted(raw[0]) == ["0", "1", "2", "3"]
    SparseConfig.load(out).check_model(2, 4)
    (tmp_path / "bad_ids.txt").write_text("1 2 99999")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        main(["--model", str(tmp_path / "model"), "--token-ids", str(tmp_path / "bad_ids.txt"), "--no-progress",
              "-o", str(tmp_path / "x.json")])


def test_cli_synthetic_and_command_table(tmp_path):
    from sparse_attn.__main__ import COMMANDS
    assert COMMANDS["calibrate"][0] == ".tools.calibrate_cli"
    out = tmp_path / "syn.json"
    assert main(["--synthetic", "--layers", "1", "--seq-len", "512", "-o", str(out), "--no-progress"]) == 0
    assert SparseConfig.load(out).num_heads == 4


def test_calibrated_config_drives_hf_patch(tiny, tmp_path):
    """Once the HF integration is merged: a calibrated config loads into `patch`; an all-dense calibration (target
    1.0) reproduces the dense logits, a sparse one changes them, and unpatch restores the model."""
    hf = pytest.importorskip("sparse_attn.integrations.hf", reason="sparse_attn.integrations.hf not merged yet")
    model, ids = tiny
    ids = ids[:1]
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    outputs = {}
    for target in (1.0, 0.7):
        result = calibrate_model(model, ids, CANDIDATES[:3], target=target, block_m=64, block_n=64, progress=False)
        path = tmp_path / f"t{target}.json"
        result.config.save(path)
        hf.patch(model, config=str(path), dense_below=1)
        try:
            with torch.no_grad():
                outputs[target] = model(input_ids=ids).logits
        finally:
            hf.unpatch(model)
        assert result.config.dense_layers == ([0, 1] if target == 1.0 else [])
    torch.testing.assert_close(outputs[1.0], dense, atol=1e-5, rtol=1e-5)
    assert (outputs[0.7] - dense).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense)


# ---------------------------------------------------------------------------------------------------- modality
def _mixed(seed=0):
    from sparse_attn.tools.synthetic import MixedWorkload, make_mixed_qkv
    q, k, _, spans = make_mixed_qkv(MixedWorkload(q_heads=4, kv_heads=2, seq_len=1000, head_dim=64, text_before=120,
                                                  text_after=120, frame_tokens=64, seed=seed))
    return q, k, spans                                                   # video 120..824: 11 frames of 64


def test_modality_candidates_chosen_when_cheaper(tmp_path):
    """On the mixed workload each head picks, among text and modality-aware candidates scored with the spans, the
    cheapest reaching the target; recall and cost recomputed from dense probabilities and the layout masks."""
    q, k, spans = _mixed()
    target = 0.9
    candidates = [VerticalSlash(vertical=v, slash=2 * v, sink=32, local=32) for v in (64, 128, 256, 512)]
    candidates += [Grid(vertical=64, slash=128, sink=32, local=32, width=4),
                   QBoundary(vertical=64, slash=128, sink=32, local=32),
                   TwoDBoundary(vertical=128, slash=256, sink=32, local=32)]
    result = calibrate_qk([(q, k)], candidates, target=target, block_m=32, block_n=32, modality=spans,
                          progress=False)
    probs = dense_probs(q, k)
    masks = [estimate(q, k, c.with_modality(spans) if hasattr(c, "with_modality") else c, block_m=32, block_n=32)
             for c in candidates]
    recall = torch.stack([mask_recall(probs, m) for m in masks] + [torch.ones(4, dtype=torch.float64)])  # + Dense
    cost = torch.stack([mask_cost(m) for m in masks] + [torch.ones(4, dtype=torch.float64)])
    pool = candidates + [Dense()]
    expected = []
    for h in range(4):
        ok = [i for i in range(len(pool)) if recall[i, h] >= target]
        expected.append(pool[min(ok, key=lambda i: (float(cost[i, h]), -float(recall[i, h])))])
    heads = result.config.layers[0]
    assert heads == expected
    modality_heads = [h for h, p in enumerate(heads) if isinstance(p, (Grid, QBoundary, TwoDBoundary))]
    assert modality_heads                                               # a real choice of a modality pattern
    for h in modality_heads:                                            # ... cheaper than any text pattern reaching it
        text_ok = [i for i in range(4) if recall[i, h] >= target] + [len(pool) - 1]
        assert cost[pool.index(heads[h]), h] < min(cost[i, h] for i in text_ok)
    assert all(p.modality is None for p in heads if hasattr(p, "modality"))
    result.config.save(tmp_path / "mixed.json")
    back = SparseConfig.load(tmp_path / "mixed.json")
    assert back.layers == result.config.layers
    assert result.metadata["calibration"]["modality"] == [[120, 824, "video", 64]]
    assert "q_boundary" in result.summary() or "grid" in result.summary()


def test_modality_candidates_without_spans_score_as_text(monkeypatch):
    """No spans: a modality candidate is scored as on an all-text call (as sparse_attn.hf runs it outside a
    modality block), so QBoundary with plain column mass scores exactly like VerticalSlash (both in fp32: the fused
    CPU score pass otherwise runs its GEMMs in bf16 where the CPU has them)."""
    monkeypatch.setenv("SPARSE_ATTN_CPU_LOW_PRECISION", "0")
    q, k, _ = _mixed()
    vs = VerticalSlash(vertical=128, slash=256, sink=32, local=32)
    qb = QBoundary(vertical=128, slash=256, sink=32, local=32, consistent_columns=False)
    result = calibrate_qk([(q, k)], [vs, qb], block_m=32, block_n=32, progress=False)
    torch.testing.assert_close(result.recall[0, 0], result.recall[0, 1])
    torch.testing.assert_close(result.cost[0, 0], result.cost[0, 1])


def test_cli_synthetic_mixed_workload(tmp_path, capsys):
    out = tmp_path / "mixed.json"
    assert main(["--synthetic", "--workload", "mixed", "--seq-len", "1000", "--frame-tokens", "64", "--layers", "1",
                 "--block-size", "32", "--target", "0.9", "--no-progress", "-o", str(out), "--candidates",
                 "vs:64:128,vs:256:512,grid:64:128,qb:64:128"]) == 0
    cfg = SparseConfig.load(out)
    names = {type(p).__name__ for layer in cfg.layers if layer for p in layer}
    assert names & {"Grid", "QBoundary"}
    assert "q_boundary" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--synthetic", "--workload", "mixed", "--modality", "0:10:image", "-o", str(out)])


def test_parse_modality():
    assert parse_modality("0:1000:text, 1000:1576:video:64,1600:1700:image") == ModalitySpans.of(
        [(0, 1000, "text"), (1000, 1576, "video", 64), (1600, 1700, "image")])
    for bad, match in (("0:10", "START:END:KIND"), ("a:10:image", "START:END:KIND"), ("0:10:audio", "kind"),
                       ("0:100:video:7", "must divide"), ("", "no span")):
        with pytest.raises(ValueError, match=match):
            parse_modality(bad)
    q, k, _ = make_qkv(1, 2, 2, 100, D=32)
    with pytest.raises(ValueError, match=r"modality: .*overlap"):
        calibrate_qk([(q, k)], CANDIDATES[:1], modality=[(0, 50, "image"), (40, 60, "video")], progress=False)
    assert parse_candidates("grid:64:128,qb:64:128,2db:64:128") == [
        cls(vertical=64, slash=128, sink=64, local=64) for cls in (Grid, QBoundary, TwoDBoundary)]
