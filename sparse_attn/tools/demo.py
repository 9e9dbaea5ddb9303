"""``python -m sparse_attn demo``: dense versus sparse attention in a transformers model, end to end.

Builds a small Llama-style model from a config (random weights, nothing downloaded), then for a long random
prompt: times one prefill forward with `sdpa` attention and patched with `sparse_attn.hf.patch`, records the density
of every estimated layout, and runs greedy `generate` with both to compare the new tokens.  Random weights give
diffuse attention (the hard case for sparse patterns); the agreement numbers show what the pattern drops there.
"""
from __future__ import annotations

import argparse
import time

import torch

from .tiny_model import tiny_llama

PATTERNS = {
    "vs": "VerticalSlash(vertical=256, slash=512)",
    "default": "the online default (VerticalSlash(gamma=0.95))",
    "ashape": "AShape(sink=128, local=1024)",
}


def pattern_of(name: str):
    import sparse_attn as sa

    return {"vs": sa.VerticalSlash(vertical=256, slash=512), "default": None,
            "ashape": sa.AShape(sink=128, local=1024)}[name]


@torch.no_grad()
def run(model, ids, new_tokens: int):
    """(prefill seconds, prefill logits [1, L, V], generated ids [1, new_tokens])."""
    start = time.perf_counter()
    logits = model(ids, use_cache=False).logits
    seconds = time.perf_counter() - start
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return seconds, logits, out[:, ids.shape[1]:]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sparse_attn demo", description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384, help="prompt tokens (default 16384)")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--pattern", choices=sorted(PATTERNS), default="vs",
                        help="; ".join(f"{k}: {v}" for k, v in PATTERNS.items()))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dense-below", type=int, default=None, help="dense below this many keys (patch option)")
    parser.add_argument("--dense-above", type=float, default=None,
                        help="layers whose estimated density exceeds this run dense (patch option)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.length < 2 or args.new_tokens < 1:
        parser.error("--length must be >= 2 and --new-tokens >= 1")

    import sparse_attn.hf as sah

    model = tiny_llama(args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, seed=args.seed)
    ids = torch.randint(1, args.vocab, (1, args.length), generator=torch.Generator().manual_seed(args.seed))
    print(f"model: Llama-style, {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
          f"({args.kv_heads} KV heads), random weights, fp32, torch threads {torch.get_num_threads()}")
    print(f"prompt: {args.length} random tokens; {args.new_tokens} new tokens (greedy); "
          f"sparse pattern: {PATTERNS[args.pattern]}")

    run(model, ids[:, :256], 1)                                                    # warm-up
    dense_s, dense_logits, dense_new = run(model, ids, args.new_tokens)

    densities = {}
    options = {k: v for k, v in (("dense_below", args.dense_below), ("dense_above", args.dense_above))
               if v is not None}
    sah.patch(model, pattern_of(args.pattern), **options,
              on_layout=lambda layer, layout, density: densities.setdefault(layer, density))
    sparse_s, sparse_logits, sparse_new = run(model, ids, args.new_tokens)
    above = model._sparse_attn_state.options["dense_above"]
    sah.unpatch(model)

    diff = (sparse_logits - dense_logits).abs().max().item()
    scale = dense_logits.abs().max().item()
    same = int((sparse_new == dense_new).sum())
    print(f"\nprefill  sdpa {dense_s:7.2f} s   sparse {sparse_s:7.2f} s   speedup {dense_s / sparse_s:.2f}x")
    if densities:
        per_layer = "  ".join(f"L{i}:{d:.3f}" for i, d in sorted(densities.items()))
        dense_layers = [i for i, d in sorted(densities.items()) if d > above]
        print(f"density  {per_layer}   (mean {sum(densities.values()) / len(densities):.3f}; layers above "
              f"dense_above={above} ran dense: {dense_layers or 'none'})")
    else:
        print("density  no layout estimated (prompt below dense_below): every layer ran dense")
    print(f"agreement  max |logit diff| over the prefill {diff:.3g} (max |logit| {scale:.3g}); "
          f"same new tokens {same}/{args.new_tokens}: sdpa {dense_new[0].tolist()} sparse {sparse_new[0].tolist()}")
    return 0
