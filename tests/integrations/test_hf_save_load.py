"""The sparse settings travel with the model: `save_pretrained` of a patched model writes them into config.json,
``from_pretrained(..., attn_implementation="sparse_attn")`` runs with them, and `patch` reads them back."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_attn as sa  # noqa: E402
import sparse_attn.hf as sah  # noqa: E402
from sparse_attn.integrations.hf.attention import STATE_ATTR  # noqa: E402
from sparse_attn.integrations.hf.saved_config import FIELD  # noqa: E402
from sparse_attn.tools.tiny_model import tiny_causal_lm  # noqa: E402

VOCAB, L = 128, 200
SPARSE = sa.VerticalSlash(vertical=8, slash=64, sink=4, local=16)     # a real budget at L=200


def _model(family="llama", layers=2, **fields):
    return tiny_causal_lm(family, layers, hidden=64, vocab=VOCAB, **fields)


def _ids():
    return torch.randint(3, VOCAB, (1, L), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model):
    return model(_ids()).logits


def _load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Qwen2 saved while patched with a real budget: (directory, dense logits, patched logits)."""
    path = tmp_path_factory.mktemp("patched_qwen2")
    model = _model(family="qwen2")
    dense = _logits(model)
    sah.patch(model, SPARSE, dense_below=0, dense_above=0.9)
    sparse = _logits(model)
    model.save_pretrained(path)
    return path, dense, sparse


def test_save_pretrained_writes_the_settings(saved):
    path, dense, sparse = saved
    field = json.loads((path / "config.json").read_text())[FIELD]
    assert field["format"] == "sparse_attn.hf" and field["previous_attn_implementation"] == "sdpa"
    assert (field["dense_below"], field["dense_above"], field["backend"]) == (0, 0.9, "auto")
    heads = field["config"]["layers"][0]
    assert len(heads) == 4 and heads[0]["pattern"] == "vertical_slash" and heads[0]["vertical"] == 8
    assert (sparse - dense).abs().max() > 1e-3            # the budget is real: a dense run would not match


def test_from_pretrained_with_our_name_runs_the_saved_config(saved):
    path, dense, sparse = saved
    model = _load(path, attn_implementation=sah.IMPLEMENTATION)
    assert model.config._attn_implementation == sah.IMPLEMENTATION
    assert torch.equal(_logits(model), sparse)
    sah.unpatch(model)                                    # back to the implementation saved as the previous one
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, FIELD)
    assert not any(STATE_ATTR in m.__dict__ for m in model.modules())
    torch.testing.assert_close(_logits(model), dense, rtol=1e-5, atol=1e-5)


def test_patch_reads_the_saved_settings_and_arguments_override(saved):
    path, dense, sparse = saved
    model = _load(path)
    assert model.config._attn_implementation == "sdpa"                   # the saved field alone changes nothing
    torch.testing.assert_close(_logits(model), dense, rtol=1e-5, atol=1e-5)
    sah.patch(model)
    assert getattr(model, STATE_ATTR).options["dense_above"] == 0.9
    assert torch.equal(_logits(model), sparse)
    sah.patch(model, sa.VerticalSlash(vertical=10**6, slash=10**6), dense_below=0)     # a full budget instead
    torch.testing.assert_close(_logits(model), dense, rtol=1e-4, atol=1e-4)


def test_from_pretrained_without_saved_settings_uses_the_online_defaults(tmp_path):
    _model().save_pretrained(tmp_path)
    model = _load(tmp_path, attn_implementation=sah.IMPLEMENTATION)
    dense = _logits(_load(tmp_path))
    torch.testing.assert_close(_logits(model), dense, rtol=1e-5, atol=1e-5)     # 200 keys < dense_below
    state = getattr(model.model.layers[0].self_attn, STATE_ATTR)
    assert state.config is None and state.options["dense_above"] == sah.ONLINE_DENSE_ABOVE
    sah.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_bad_saved_field_names_itself(tmp_path):
    model = _model()
    setattr(model.config, FIELD, {"format": "sparse_attn.hf", "version": 1, "dense_below": -1})
    with pytest.raises(ValueError, match="dense_below must be an int >= 0"):
        sah.patch(model)
    setattr(model.config, FIELD, {"format": "something else"})
    with pytest.raises(ValueError, match=f"the model config's '{FIELD}' field"):
        sah.patch(model)
    assert model.config._attn_implementation == "sdpa"
