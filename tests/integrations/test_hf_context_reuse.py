"""Context reuse with a tiny Llama: the follow-up's logits after a restored context equal a dense prefill of the
whole prompt (full KV, and a retrieval cache whose top_k covers every key); mismatched or damaged saves are refused
before anything is restored; the catalogue serves the longest saved prefix."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="needs transformers 5.x").CacheLayerMixin

import sparse_attn.hf as sah  # noqa: E402
from sparse_attn import VerticalSlash  # noqa: E402
from sparse_attn.errors import SavedContextMismatchError, SparseAttnError  # noqa: E402
from sparse_attn.integrations.hf.decode_cache import RetrievalCache, register  # noqa: E402
from sparse_attn.retrieval import ContextCatalogue, KVFileError  # noqa: E402
from sparse_attn.tools.tiny_model import tiny_llama  # noqa: E402

FULL = VerticalSlash(vertical=10**6, slash=10**6, last_q=16)
CONTEXT, SUFFIX = 77, 23


def _model(seed=0, kv_heads=2):
    return tiny_llama(layers=2, hidden=64, heads=4, kv_heads=kv_heads, vocab=97, seed=seed)


def _ids(n=CONTEXT + SUFFIX, seed=1):
    return torch.randint(1, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, cache=None):
    return model(ids, cache=cache).logits


@torch.no_grad()
def _prefilled(model, ids, cache=None):
    """The cache after a prefill of ``ids`` (a DynamicCache unless one is given)."""
    out = model(ids, cache=cache, use_cache=True)
    return out.cache if "cache" in out else out.past_key_values          # renamed in transformers 5.x


def _close(actual, expected):                    # fp32 rounding: different summation orders, same numbers
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "patched"])
def test_restored_full_kv_gives_the_dense_logits(tmp_path, attention):
    model, ids = _model(), _ids()
    dense = _logits(model, ids)                                             # sdpa over the whole prompt
    sah.save_context(model, _prefilled(model, ids[:, :CONTEXT]), ids[:, :CONTEXT], tmp_path, sink=4, window=16)
    if attention == "patched":
        sah.patch(model, FULL, dense_below=0)                               # the suffix runs sparse_attention
    else:
        model.set_attn_implementation(attention)
    restored = sah.restore_context(model, tmp_path, ids)
    assert restored.tokens == CONTEXT and restored.cache.get_seq_length() == CONTEXT
    _close(_logits(model, ids[:, CONTEXT:], restored.cache), dense[:, CONTEXT:])


@pytest.mark.parametrize("saved_from", ["dynamic", "retrieval"])
def test_restored_retrieval_cache_covering_every_key_gives_the_dense_logits(tmp_path, saved_from):
    model, ids = _model(), _ids()
    dense = _logits(model, ids)
    if saved_from == "dynamic":
        cache = _prefilled(model, ids[:, :CONTEXT])
    else:                                 # prefilled through the retrieval cache, its index saved with it
        model.set_attn_implementation(register())
        cache = _prefilled(model, ids[:, :CONTEXT], RetrievalCache(model.config, top_k=512, sink=4, window=16,
                                                                     index="exact"))
    sah.save_context(model, cache, ids[:, :CONTEXT], tmp_path / "ctx", sink=4, window=16)
    model.set_attn_implementation(register())
    restored = sah.restore_context(model, tmp_path / "ctx", ids, into="retrieval", top_k=512,
                                   scratch_dir=tmp_path / "scratch")
    layer = restored.cache.layers[0].cache
    assert layer.n_offloaded == CONTEXT - 20 and layer.ram_values is None   # the values stay in the saved files
    _close(_logits(model, ids[:, CONTEXT:], restored.cache), dense[:, CONTEXT:])
    assert layer.seq_len == CONTEXT + SUFFIX


@pytest.mark.parametrize("into", ["dynamic", "retrieval"])
def test_generate_goes_on_from_a_restored_cache(tmp_path, into):
    model, ids = _model(), _ids()

    def generate(cache=None):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache,
                                  attention_mask=torch.ones_like(ids), pad_token_id=0)

    dense = generate()
    sah.save_context(model, _prefilled(model, ids[:, :CONTEXT]), ids[:, :CONTEXT], tmp_path / "ctx", sink=4,
                     window=16)
    if into == "retrieval":
        model.set_attn_implementation(register())
    restored = sah.restore_context(model, tmp_path / "ctx", ids, into=into, top_k=512,
                                   scratch_dir=tmp_path / "scratch")
    assert torch.equal(generate(restored.cache), dense)          # generate prefills only the uncached suffix


def test_catalogue_serves_the_longest_saved_prefix(tmp_path):
    model, ids = _model(), _ids()
    dense = _logits(model, ids)
    catalogue = ContextCatalogue(tmp_path, block_tokens=16)
    for n in (40, CONTEXT):
        sah.save_context(model, _prefilled(model, ids[:, :n]), ids[:, :n], catalogue, sink=4, window=16)
    restored = sah.reuse_context(model, ids, catalogue)
    assert restored.tokens == CONTEXT
    _close(_logits(model, ids[:, CONTEXT:], restored.cache), dense[:, CONTEXT:])
    same = sah.reuse_context(model, ids[:, :CONTEXT], catalogue)            # the whole prompt is saved: keep one
    assert same.tokens == CONTEXT - 1                                       # token to prefill for its logits
    _close(_logits(model, ids[:, CONTEXT - 1:CONTEXT], same.cache), dense[:, CONTEXT - 1:CONTEXT])
    assert sah.reuse_context(_model(seed=5), ids, catalogue) is None         # another model's weights: no match
    assert sah.reuse_context(model, _ids(seed=9), catalogue) is None


def _saved(tmp_path):
    model, ids = _model(), _ids()
    sah.save_context(model, _prefilled(model, ids[:, :CONTEXT]), ids[:, :CONTEXT], tmp_path, sink=4, window=16,
                     page_tokens=8)
    return model, ids


@pytest.mark.parametrize("other", ["kv_heads", "weights"])
def test_another_models_context_is_refused(tmp_path, other):
    _, ids = _saved(tmp_path)
    model = _model(kv_heads=1) if other == "kv_heads" else _model(seed=3)
    with pytest.raises(SavedContextMismatchError, match=f"belongs to another model: .*{other}: saved"):
        sah.restore_context(model, tmp_path, ids)


def test_other_tokens_are_refused(tmp_path):
    model, ids = _saved(tmp_path)
    other = ids.clone()
    other[0, 30] = (other[0, 30] + 1) % 97
    with pytest.raises(SavedContextMismatchError, match="holds other tokens: .* at position 30"):
        sah.restore_context(model, tmp_path, other)
    with pytest.raises(SavedContextMismatchError):
        sah.restore_context(model, tmp_path, other, into="retrieval", scratch_dir=tmp_path / "s")


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated_file"])
@pytest.mark.parametrize("into", ["dynamic", "retrieval"])
def test_damaged_files_are_refused(tmp_path, damage, into):
    model, ids = _saved(tmp_path / "ctx")
    path = tmp_path / "ctx" / "layer1.keys.kv"
    if damage == "flipped_byte":
        with open(path, "r+b") as f:
            f.seek(4096 + 123)
            byte = f.read(1)
            f.seek(4096 + 123)
            f.write(bytes([byte[0] ^ 1]))
    else:
        os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(KVFileError, match="layer1.keys.kv") as err:
        sah.restore_context(model, tmp_path / "ctx", ids, into=into, scratch_dir=tmp_path / "s")
    assert isinstance(err.value, SparseAttnError)


def test_bad_arguments(tmp_path):
    model, ids = _saved(tmp_path)
    with pytest.raises(ValueError, match="into must be one of"):
        sah.restore_context(model, tmp_path, ids, into="ram")
    with pytest.raises(ValueError, match="scratch_dir is required"):
        sah.restore_context(model, tmp_path, ids, into="retrieval")
    with pytest.raises(ValueError, match=r"cache has 2 layers|layer 0 holds"):
        sah.save_context(model, _prefilled(model, ids[:, :10]), ids[:, :11], tmp_path / "x")
    with pytest.raises(TypeError, match="cache must be"):
        sah.save_context(model, None, ids, tmp_path / "y")


def test_reuse_benchmark_script_runs(tmp_path):
    """bench/context_reuse.py at a toy size: every variant runs; full-KV restores give the dense first token."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "context_reuse.py")
    spec = importlib.util.spec_from_file_location("context_reuse_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "report.txt"
    bench.main(["--context", "300", "--question", "7", "--rounds", "1", "--layers", "1",
                "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "97", "--read-mib", "8",
                "--dir", str(tmp_path), "--out", str(out)])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| ") and "variant" not in line}
    assert sorted(rows) == ["dense", "ram", "sparse", "ssd", "ssd-retrieval"]
    for name in ("ram", "ssd"):
        assert float(rows[name][4]) < 1e-4 and rows[name][5] == "True"
