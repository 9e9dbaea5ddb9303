"""The catalogue of saved contexts: longest-prefix choice (whole contexts and whole blocks), per model, and
eviction of the least recently used contexts by total size."""
from __future__ import annotations

import os

import pytest
import torch

from sparse_attn.errors import InvalidArgumentError
from sparse_attn.retrieval import ContextCatalogue, KVFileError, save_context_kv

BLOCK = 16


def _ids(n, seed=0):
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _save(catalogue, ids, model="m1"):
    directory = catalogue.new_directory()
    k = torch.randn(1, 1, len(ids), 8)
    save_context_kv(directory, [(k, k.clone())], ids, {"model": model}, sink=2, window=4)
    catalogue.add(directory, ids, model)
    return os.path.basename(directory)


def test_longest_prefix_is_chosen(tmp_path):
    cat = ContextCatalogue(tmp_path, block_tokens=BLOCK)
    base, other = _ids(200, 0), _ids(200, 1)
    a, b = _save(cat, base[:40]), _save(cat, base[:100])
    _save(cat, other[:120])
    _save(cat, base[:150], model="m2")                       # the longest, but another model's
    m = cat.lookup(base[:130], "m1")
    assert (m.name, m.tokens, m.saved_tokens) == (b, 100, 100)              # the whole of b
    m = cat.lookup(base[:70] + other[:20], "m1")
    assert (m.name, m.tokens) == (b, 64)                     # 4 whole blocks of b beat all 40 tokens of a
    m = cat.lookup(base[:40], "m1")
    assert (m.name, m.tokens) == (a, 40)                     # all of a beats 2 blocks (32 tokens) of b
    m = cat.lookup(base[:45], "m1")
    assert (m.name, m.tokens) == (a, 40)
    assert cat.lookup(base[:10], "m1") is None               # less than a block and no whole context
    assert cat.lookup(_ids(300, 7), "m1") is None
    assert cat.lookup(base[:150], "m2").tokens == 150
    assert cat.lookup(base[:150], "m3") is None
    changed = base[:39] + [base[39] + 1] + base[40:100]
    m = cat.lookup(changed, "m1")
    assert m.tokens == 32                                    # a's last token differs: 2 blocks of a or b remain
    again = ContextCatalogue(tmp_path, block_tokens=BLOCK)     # the catalogue is on disk
    assert again.lookup(base[:130], "m1").name == b


def test_ties_go_to_the_most_recently_used(tmp_path):
    cat = ContextCatalogue(tmp_path, block_tokens=BLOCK)
    base = _ids(100)
    a, b = _save(cat, base[:40]), _save(cat, base[:50])
    request = base[:35] + [5000]
    assert cat.lookup(request, "m1").name == b and cat.lookup(request, "m1").tokens == 32
    assert cat.lookup(base[:40], "m1").name == a             # a use of a ...
    assert cat.lookup(request, "m1").name == a               # ... makes it the more recent of the two


def test_eviction_by_total_size_drops_the_least_recently_used(tmp_path):
    probe = ContextCatalogue(tmp_path / "probe")
    _save(probe, _ids(64, 0))
    size = probe.total_bytes()
    cat = ContextCatalogue(tmp_path / "c", max_bytes=int(2.5 * size), block_tokens=BLOCK)
    names = [_save(cat, _ids(64, s)) for s in range(2)]
    assert cat.lookup(_ids(64, 0), "m1").name == names[0]    # 0 is now used more recently than 1
    names.append(_save(cat, _ids(64, 2)))
    assert sorted(cat.entries()) == sorted([names[0], names[2]])
    assert not (tmp_path / "c" / names[1]).exists() and cat.total_bytes() <= 2.5 * size
    assert cat.lookup(_ids(64, 1), "m1") is None
    tight = ContextCatalogue(tmp_path / "t", max_bytes=size // 2)
    big = tight.new_directory()
    save_context_kv(big, [(torch.randn(1, 1, 64, 8),) * 2], _ids(64), {"model": "m1"})
    assert tight.add(big, _ids(64), "m1") == [os.path.basename(big)]          # alone larger than the bound
    assert tight.entries() == {} and not os.path.exists(big)


def test_contexts_removed_by_hand_are_forgotten_and_damage_is_refused(tmp_path):
    cat = ContextCatalogue(tmp_path, block_tokens=BLOCK)
    base = _ids(64)
    name = _save(cat, base)
    os.remove(tmp_path / name / "context.json")
    assert cat.lookup(base, "m1") is None
    _save(cat, base[:32])
    assert name not in cat.entries()
    with open(tmp_path / "catalogue.json", "r+") as f:
        text = f.read().replace('"tokens": 32', '"tokens": 33')
        f.seek(0)
        f.write(text)
    with pytest.raises(KVFileError, match="catalogue"):
        cat.lookup(base, "m1")


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidArgumentError, match="max_bytes"):
        ContextCatalogue(tmp_path, max_bytes=0)
    with pytest.raises(InvalidArgumentError, match="block_tokens"):
        ContextCatalogue(tmp_path, block_tokens=0)
    ContextCatalogue(tmp_path, block_tokens=16).add(*_one_context(tmp_path), "m1")
    with pytest.raises(InvalidArgumentError, match="block_tokens: the catalogue .* uses 16"):
        ContextCatalogue(tmp_path, block_tokens=32).entries()
    with pytest.raises(InvalidArgumentError, match="directory must be a saved context directly under"):
        ContextCatalogue(tmp_path / "other").add(tmp_path / "elsewhere", [1, 2], "m1")


def _one_context(root):
    directory = ContextCatalogue(root, block_tokens=16).new_directory()
    k = torch.randn(1, 1, 20, 8)
    save_context_kv(directory, [(k, k)], list(range(20)), {"model": "m1"})
    return directory, list(range(20))
