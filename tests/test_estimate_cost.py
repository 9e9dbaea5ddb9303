"""The cheaper paths of the default pattern's estimate against their readable definitions: the histogram key count
(`estimators.mass_count`) against the sort, and the top-k first `_cheapest_slashes` against the full sort."""
import pytest
import torch

from sparse_attn.estimators import mass_count
from sparse_attn.patterns import vertical_slash


def _rows(seed, shape, peak):
    """Rows of probabilities from logits of growing spread (``peak``), a few exact zeros (hidden keys)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g) * peak
    logits[..., -3:] = float("-inf")
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("peak", [0.1, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("gamma", [0.5, 0.95, 0.99])
def test_histogram_key_count_stays_within_its_bucket_of_the_sort(peak, gamma):
    probs = _rows(int(peak * 10), (3, 5, 777), peak)
    exact = mass_count.keys_for_mass_sorted(probs, gamma).float()
    got = mass_count.keys_for_mass(probs, gamma)
    assert got.shape == exact.shape and got.dtype == torch.float32
    # the answer lies inside the crossing bucket: never off by more than the keys whose probability is within a
    # factor e^(1/8) of the exact answer's last key
    last = probs.sort(-1, descending=True).values.gather(-1, exact.long()[..., None] - 1)
    ratio = torch.exp(torch.tensor(1 / mass_count.BUCKETS_PER_NAT))
    near = ((probs <= last * ratio) & (probs >= last / ratio)).sum(-1).float()
    assert ((got - exact).abs() <= near).all()
    assert (got >= 1).all() and (got <= probs.shape[-1]).all()


def test_histogram_key_count_is_exact_on_separated_masses():
    # one key with 0.9 of the mass, the rest spread evenly: 0.9 needs 1 key, 0.95 needs 1 + ceil(0.05 / per_key)
    K = 1001
    probs = torch.full((1, K), 0.1 / (K - 1))
    probs[0, 17] = 0.9
    assert mass_count.keys_for_mass(probs, 0.9).item() == 1
    want = mass_count.keys_for_mass_sorted(probs, 0.95).item()
    assert mass_count.keys_for_mass(probs, 0.95).item() == want == 1 + 500


def _slash_inputs(seed, B=2, h=3, Lk=5000, block_n=64, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    col = torch.softmax(torch.randn(B, h, Lk, generator=g) * spread, -1) * 64
    n_b = -(-Lk // block_n)
    group_mass = torch.softmax(torch.randn(B, h, n_b, generator=g) * spread, -1) * 64
    force_v = torch.arange(Lk) < torch.tensor([0, 4, 64])[:, None]
    force_s = torch.arange(n_b) * block_n < torch.tensor([64, 0, 128])[:, None]
    target = torch.tensor([0.95, 0.9, 0.5])[:, None] * 64
    return col, group_mass, block_n, target, force_v, force_s


@pytest.mark.parametrize("spread", [0.05, 2.0, 6.0])      # 0.05: too flat for the top-k, the full sort answers
def test_cheapest_slashes_top_k_first_equals_the_full_sort(spread, monkeypatch):
    args = _slash_inputs(int(spread * 10), spread=spread)
    got = vertical_slash._cheapest_slashes(*args)
    monkeypatch.setattr(vertical_slash, "_CHEAPEST_FIRST", 10 ** 9)                # only the full sort
    want = vertical_slash._cheapest_slashes(*args)
    assert torch.equal(got, want)
    assert got.any() and not got.all()
