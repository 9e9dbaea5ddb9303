"""Saved contexts without transformers: full-KV round trips, a live retrieval cache saved and restored (same
attention, same retrieved keys), saved files untouched by the restored request, refusals of damaged or mismatched
saves."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

import sparse_attn as sa
from sparse_attn.errors import InvalidArgumentError, SavedContextMismatchError, SparseAttnError
from sparse_attn.retrieval import (KVFileError, PagedVectorFile, RetrievalKVCache, check_context, open_context_cache,
                                   read_context_info, read_context_kv, retrieval_attention, save_context_kv)
from helpers import assert_close

from retrieval_helpers import decode_inputs, filled_cache

IDENTITY = {"architecture": "Toy", "layers": 2, "kv_heads": 2, "rope": {"theta": 10000.0}}


def _kv(L, seed, Hkv=2, D=32, dtype=torch.float32, blhd=False):
    """``k, v [1, Hkv, L, D]``; ``blhd``: views of ``[1, L, Hkv, D]`` tensors (not contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    if blhd:
        return tuple(torch.randn(1, L, Hkv, D, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    return (torch.randn(1, Hkv, L, D, generator=gen).to(dtype), torch.randn(1, Hkv, L, D, generator=gen).to(dtype))


def _ids(n, seed=0):
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _file_hashes(directory):
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("L", [1, 20, 113])                     # inside the sinks, inside the window, offloaded
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_kv_round_trip_is_exact(tmp_path, L, dtype):
    layers = [_kv(L, 0, dtype=dtype), _kv(L, 1, dtype=dtype, blhd=True)]
    ids = _ids(L)
    nbytes = save_context_kv(tmp_path, layers, ids, IDENTITY, sink=4, window=16, page_tokens=8)
    assert nbytes > sum(2 * k.numel() * k.element_size() for k, _ in layers)
    info = read_context_info(tmp_path)
    assert info["tokens"] == L and info["token_ids"] == ids and info["layers"] == 2
    for i, (k, v) in enumerate(layers):
        k2, v2, read = read_context_kv(tmp_path, i)
        assert k2.dtype == dtype and torch.equal(k2, k) and torch.equal(v2, v)
        assert read >= 2 * k.numel() * k.element_size()


def _live_cache(ssd_dir=None, index="exact", L=113):
    q, k, v = decode_inputs(B=1, Hq=4, Hkv=2, L=L, D=32, Lq=3, seed=3)
    cache = filled_cache(k, v, chunks=(0.4, 0.7), sink=4, window=16, index=index, ssd_dir=ssd_dir, page_tokens=8)
    cache.observe_queries(q)
    return q, k, v, cache


def _fast_index():
    from sparse_attn.retrieval import FastScanIndex
    return FastScanIndex(nlist=4, train_min=32, tail_max=8, probe_keys=0.5, shortlist=16)


@pytest.mark.parametrize("where", ["ram", "ssd", "fast_index"])
def test_live_cache_saved_and_restored_attends_the_same(tmp_path, where):
    if where == "fast_index":
        pytest.importorskip("faiss")
    index = _fast_index() if where == "fast_index" else "exact"
    q, k, v, live = _live_cache(tmp_path / "live" if where == "ssd" else None, index)
    top_k = 8 if where == "fast_index" else 200
    before, ids_before = retrieval_attention(q, live, top_k, return_indices=True)       # trains/syncs the index
    saved = tmp_path / "ctx"
    save_context_kv(saved, [live], _ids(113), IDENTITY)
    k2, v2, _ = read_context_kv(saved, 0)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    hashes = _file_hashes(saved)
    restored = open_context_cache(saved, 0, scratch_dir=tmp_path / "scratch")
    assert type(restored.index) is type(live.index) and restored.n_offloaded == live.n_offloaded
    after, ids_after = retrieval_attention(q, restored, top_k, return_indices=True)
    assert torch.equal(ids_after, ids_before) and torch.equal(after, before)
    if where != "fast_index":
        assert_close(after, sa.reference_attention(q, k, v), atol=2e-6, rtol=1e-5)
    # the request goes on: its tokens land in scratch_dir, the saved files stay byte for byte as saved
    k_new, v_new = _kv(40, 9, D=32)
    for c in (live, restored):
        c.append(k_new, v_new)
    q2 = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(retrieval_attention(q2, restored, top_k), retrieval_attention(q2, live, top_k))
    assert _file_hashes(saved) == hashes
    again = open_context_cache(saved, 0, scratch_dir=tmp_path / "scratch2")
    assert torch.equal(retrieval_attention(q, again, top_k), before)
    # the next turn: the restored, extended cache is saved in turn (its values in two files)
    save_context_kv(tmp_path / "turn2", [restored], _ids(153), IDENTITY)
    k3, v3, _ = read_context_kv(tmp_path / "turn2", 0)
    assert torch.equal(k3, torch.cat([k, k_new], 2)) and torch.equal(v3, torch.cat([v, v_new], 2))


def test_prefix_of_a_saved_context_restores_only_that_prefix(tmp_path):
    q, k, v, live = _live_cache()
    save_context_kv(tmp_path / "ctx", [live], _ids(113), IDENTITY)
    part = open_context_cache(tmp_path / "ctx", 0, scratch_dir=tmp_path / "s", tokens=70, index="exact")
    assert part.seq_len == 70
    assert_close(retrieval_attention(q, part, 500), sa.reference_attention(q, k[:, :, :70], v[:, :, :70]),
                 atol=2e-6, rtol=1e-5)


def test_scratch_dir_must_not_be_the_saved_directory(tmp_path):
    save_context_kv(tmp_path, [_kv(50, 0)], _ids(50), IDENTITY, sink=4, window=16)
    with pytest.raises(ValueError, match="scratch_dir must differ"):
        RetrievalKVCache.open(tmp_path, 0, scratch_dir=tmp_path)
    saved = PagedVectorFile.open(tmp_path / "layer0.values.kv", read_only=True)
    with pytest.raises(KVFileError, match="read-only"):
        saved.append(torch.zeros(2, 1, 32))


# ---------------------------------------------------------------------------------------------------- refusals
def test_other_model_or_other_tokens_are_refused(tmp_path):
    ids = _ids(60)
    save_context_kv(tmp_path, [_kv(60, 0)], ids, IDENTITY, sink=4, window=16)
    info = read_context_info(tmp_path)
    assert check_context(info, dict(IDENTITY), ids + [7, 8]) == 60
    assert check_context(info, IDENTITY, ids, tokens=30) == 30
    other = {**IDENTITY, "rope": {"theta": 500000.0}}
    with pytest.raises(SavedContextMismatchError, match=r"another model: rope: saved \{'theta': 10000.0\}"):
        check_context(info, other, ids)
    changed = ids[:41] + [ids[41] + 1] + ids[42:]
    with pytest.raises(SavedContextMismatchError, match="differ from the saved tokens at position 41"):
        check_context(info, IDENTITY, changed)
    assert check_context(info, IDENTITY, changed, tokens=41) == 41         # the common prefix is still usable
    with pytest.raises(InvalidArgumentError, match="token_ids has 59 tokens"):
        check_context(info, IDENTITY, ids[:59])
    with pytest.raises(InvalidArgumentError, match=r"tokens must be an int in \[1, 60\]"):
        check_context(info, IDENTITY, ids, tokens=61)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["values_byte", "keys_byte", "window_byte", "context_json", "layer_meta",
                                    "truncated_values", "missing_table"])
def test_damaged_saves_are_refused(tmp_path, damage):
    save_context_kv(tmp_path, [_kv(113, 0), _kv(113, 1)], _ids(113), IDENTITY, sink=4, window=16, page_tokens=8)
    layer1 = lambda what: os.path.join(tmp_path, f"layer1.{what}")          # noqa: E731
    if damage == "values_byte":
        _flip(layer1("values.kv"), os.path.getsize(layer1("values.kv")) - 5)
    elif damage == "keys_byte":
        _flip(layer1("keys.kv"), 4096 + 100)
    elif damage == "window_byte":
        _flip(layer1("window_v.kv"), 4096 + 3)
    elif damage == "context_json":
        text = open(tmp_path / "context.json").read().replace('"tokens": 113', '"tokens": 112')
        open(tmp_path / "context.json", "w").write(text)
    elif damage == "layer_meta":
        text = open(layer1("meta.json")).read().replace('"sink": 4', '"sink": 5')
        open(layer1("meta.json"), "w").write(text)
    elif damage == "truncated_values":
        os.truncate(layer1("values.kv"), os.path.getsize(layer1("values.kv")) - 1000)
    else:
        os.remove(layer1("keys.kv.table"))
    with pytest.raises(KVFileError) as err:
        read_context_info(tmp_path)
        for i in range(2):
            read_context_kv(tmp_path, i)
    assert isinstance(err.value, SparseAttnError) and str(tmp_path) in str(err.value)


def test_a_flipped_value_byte_stops_retrieval_from_ssd(tmp_path):
    """The retrieval restore leaves values on disk: a damaged page is refused when retrieval reads it."""
    q, k, v, live = _live_cache()
    save_context_kv(tmp_path / "ctx", [live], _ids(113), IDENTITY)
    _flip(tmp_path / "ctx" / "layer0.values.kv", 4096 + 7)
    restored = open_context_cache(tmp_path / "ctx", 0, scratch_dir=tmp_path / "s")
    with pytest.raises(KVFileError, match="checksum mismatch in page 0"):
        retrieval_attention(q, restored, 200)


def test_bad_layers_are_refused(tmp_path):
    k, v = _kv(30, 0)
    with pytest.raises(InvalidArgumentError, match="one sequence"):
        save_context_kv(tmp_path, [(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))], _ids(30), IDENTITY)
    with pytest.raises(InvalidArgumentError, match="layer 0 holds 30 tokens, token_ids has 29"):
        save_context_kv(tmp_path, [(k, v)], _ids(29), IDENTITY)
    with pytest.raises(TypeError, match="layers: each layer"):
        save_context_kv(tmp_path, [k], _ids(30), IDENTITY)
    with pytest.raises(ValueError, match="token_ids must be integer ids"):
        save_context_kv(tmp_path, [(k, v)], torch.zeros(30), IDENTITY)
