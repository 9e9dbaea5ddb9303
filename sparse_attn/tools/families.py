"""The model-family check behind `bench/hf_families.py`: one tiny random-weight model per family
(`tiny_model.FAMILIES`), patched with a budget covering every key, against the same model with its own attention
(``sdpa``; Gemma-2 has none, so ``eager``).

Per family: max |logit diff| of one row, of a left-padded batch of two different rows (kept positions), greedy
tokens of both, how many layer calls ran the sparse kernel (so an equal result is not a dense run in disguise), and
whether `unpatch` restores the implementation and bit-identical logits.  A family whose model refuses the patch
gets its reason instead.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

#: a budget covering every key: the sparse path must then equal dense attention
FULL_BUDGET = dict(vertical=10**6, slash=10**6)
LENGTH, PAD, NEW_TOKENS, VOCAB = 200, 37, 8, 128         # 200: not a multiple of the 64-row blocks


@dataclass
class FamilyResult:
    family: str
    model: str = ""
    baseline: str = ""
    refused: str | None = None             # why patch refused the model (then nothing else is measured)
    logit_diff: float = float("nan")       # one row, max |patched - baseline|
    padded_diff: float = float("nan")      # left-padded batch of 2, kept positions
    tokens_equal: bool = False             # greedy tokens, the row and the padded batch
    sparse_calls: int = 0                  # layers that ran the sparse kernel in the row's forward
    layers: int = 0
    unpatch_restores: bool = False
    notes: list = field(default_factory=list)
    seconds: float = 0.0


def _inputs():
    gen = torch.Generator().manual_seed(1)
    row = torch.randint(3, VOCAB, (1, LENGTH), generator=gen)
    batch = torch.randint(3, VOCAB, (2, LENGTH), generator=gen)
    mask = torch.ones_like(batch)
    mask[1, :PAD] = 0
    batch[1, :PAD] = 0
    return row, batch, mask


@torch.no_grad()
def _outputs(model, row, batch, mask):
    logits = model(row).logits
    padded = model(batch, attention_mask=mask).logits
    tokens = model.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=NEW_TOKENS, do_sample=False)
    padded_tokens = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, padded, tokens, padded_tokens


def check_family(family: str, *, pattern=None, layers: int = 4) -> FamilyResult:
    """Measure one family (see the module docstring); ``pattern`` replaces the full budget (to see the check
    tell a real budget apart from dense)."""
    import sparse_attn as sa
    import sparse_attn.hf as sah
    from .tiny_model import tiny_causal_lm

    start = time.perf_counter()
    model = tiny_causal_lm(family, layers, hidden=64, vocab=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    result = FamilyResult(family, type(model).__name__, model.config._attn_implementation, layers=layers)
    row, batch, mask = _inputs()
    base_logits, base_padded, base_tokens, base_padded_tokens = _outputs(model, row, batch, mask)
    calls = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            sah.patch(model, pattern or sa.VerticalSlash(**FULL_BUDGET), dense_below=0, dense_above=1.0,
                      on_layout=lambda layer, layout, density: calls.append(layer))
        except (ValueError, TypeError) as e:
            result.refused = " ".join(str(e).split())
            result.seconds = time.perf_counter() - start
            return result
    result.notes += [str(w.message).split(": ", 1)[-1] for w in seen if "sliding window" in str(w.message)]
    calls.clear()
    with torch.no_grad():
        model(row)
    result.sparse_calls = len(calls)   # with dense_above=1 every estimated layout runs the sparse kernel
    logits, padded, tokens, padded_tokens = _outputs(model, row, batch, mask)
    keep = mask.bool()
    result.logit_diff = (logits - base_logits).abs().max().item()
    result.padded_diff = (padded - base_padded)[keep].abs().max().item()
    result.tokens_equal = torch.equal(tokens, base_tokens) and torch.equal(padded_tokens, base_padded_tokens)
    sah.unpatch(model)
    with torch.no_grad():
        result.unpatch_restores = (model.config._attn_implementation == result.baseline
                                   and torch.equal(model(row).logits, base_logits))
    result.seconds = time.perf_counter() - start
    return result


def format_table(results, tolerance: float) -> str:
    head = ("| family | model | baseline | full-budget max logit diff | padded batch max diff | greedy tokens equal | "
            "sparse layer calls | unpatch restores | time |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ok(diff):
        return f"{diff:.1e} {'ok' if diff <= tolerance else 'FAIL'}"

    for r in results:
        if r.refused:
            lines.append(f"| {r.family} | {r.model} | {r.baseline} | refused at patch: {r.refused} | | | | | "
                         f"{r.seconds:.1f} s |")
            continue
        lines.append(f"| {r.family} | {r.model} | {r.baseline} | {ok(r.logit_diff)} | {ok(r.padded_diff)} | "
                     f"{'yes' if r.tokens_equal else 'NO'} | {r.sparse_calls} of {r.layers} | "
                     f"{'yes' if r.unpatch_restores else 'NO'} | {r.seconds:.1f} s |")
    notes = [f"- {r.family}: {note}" for r in results for note in r.notes]
    return "\n".join(lines + (["", "Notes (warnings patch gave):"] + notes if notes else []))
