"""A few rows of the model-family table (`bench/hf_families.py`, `sparse_attn.tools.families`), at 2 layers:
a full budget equals the model's own attention on families with extras (Gemma-2's softcap and sliding layers,
Gemma-3, OLMo-2's QK norms, Cohere's parallel block, GPT-NeoX's fused QKV), unpatch restores them, and a model
outside transformers' attention registry is refused with its reason."""
import pytest

pytest.importorskip("transformers")

import sparse_attn as sa  # noqa: E402
from sparse_attn.tools.families import check_family, format_table  # noqa: E402

TOLERANCE = 1e-4


@pytest.mark.parametrize("family, sparse_layers", [("gemma2", 1), ("gemma3", 1), ("olmo2", 2), ("cohere", 2),
                                                   ("gpt-neox", 2)])
def test_full_budget_matches_the_models_own_attention(family, sparse_layers):
    r = check_family(family, layers=2)
    assert r.refused is None
    assert r.logit_diff <= TOLERANCE and r.padded_diff <= TOLERANCE
    assert r.tokens_equal and r.unpatch_restores
    assert r.sparse_calls == sparse_layers            # Gemma's sliding layer 0 is named, not silently dense
    assert bool(r.notes) == family.startswith("gemma")


def test_the_check_sees_a_real_budget_and_a_refusal():
    r = check_family("llama", layers=2, pattern=sa.VerticalSlash(vertical=8, slash=64, sink=4, local=16))
    assert r.sparse_calls == 2 and r.logit_diff > 1e-3 and r.unpatch_restores
    falcon = check_family("falcon", layers=2)
    assert "attention registry" in falcon.refused
    table = format_table([r, falcon], TOLERANCE)
    assert "FAIL" in table and "refused at patch" in table
