"""``python -m sparse_attn demo``: dense versus sparse attention in a transformers model, end to end.

Builds a small Llama-style model from a config (random weights, nothing downloaded), then for a long random
prompt: times one prefill forward with `sdpa` attention and patched with `sparse_attn.hf.patch`, records the density
of every estimated layout, and runs greedy `generate` with both to compare the new tokens.  Random weights give
diffuse attention (the hard case for sparse patterns); the agreement numbers show what the pattern drops there.
"""
from __future__ import annotations

import time

import torch

from .cli import Parser, input_errors
from ..prefill import dense_below_for
from .tiny_model import tiny_llama

PATTERNS = {
    "vs": "VerticalSlash(vertical=256, slash=512)",
    "default": "the online default (sparse_attn.prefill.DEFAULT_PATTERN, Auto(gamma=0.95))",
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


def layer_routes(num_layers: int, length: int, densities: dict, dense_below: int, dense_above: float) -> dict:
    """How each layer's prefill ran, from what the patched model reported: ``{layer: (ran_sparse, why)}``.

    Below ``dense_below`` keys nothing is estimated; otherwise a layer whose estimate reported a density ran sparse
    unless that density exceeded ``dense_above``, and a layer that reported none was sent to dense attention by the
    pre-check (cumulative-mass patterns: attention too diffuse for ``dense_above`` of the keys to hold the mass)."""
    routes = {}
    for layer in range(num_layers):
        if length < dense_below:
            routes[layer] = (False, f"the prompt ({length} tokens) is below dense_below={dense_below}")
        elif layer not in densities:
            routes[layer] = (False, f"the pre-check found attention too diffuse for a layout within "
                                    f"dense_above={dense_above} of the keys to keep the pattern's mass")
        elif densities[layer] > dense_above:
            routes[layer] = (False, f"the estimated density {densities[layer]:.3f} exceeds dense_above={dense_above}")
        else:
            routes[layer] = (True, f"density {densities[layer]:.3f}")
    return routes


def format_routes(routes: dict, densities: dict, dense_s: float, patched_s: float) -> list[str]:
    """The honest summary lines: a speedup only where some layer ran sparse."""
    sparse = [layer for layer, (ran, _) in routes.items() if ran]
    reasons: dict = {}
    for layer, (ran, why) in routes.items():
        if not ran:
            reasons.setdefault(why, []).append(layer)
    dense_lines = [f"  dense in layers {layers}: {why}" for why, layers in reasons.items()]
    if not sparse:
        return [f"prefill  both runs are dense attention, so there is no speedup to report (sdpa {dense_s:.2f} s, "
                f"patched {patched_s:.2f} s: timing noise and the cost of the patch's checks)", *dense_lines]
    per_layer = "  ".join(f"L{layer}:{densities[layer]:.3f}" for layer in sparse)
    return [f"prefill  sdpa {dense_s:7.2f} s   sparse {patched_s:7.2f} s   speedup {dense_s / patched_s:.2f}x",
            f"  sparse in layers {sparse} (density {per_layer})", *dense_lines]


def main(argv=None):
    parser = Parser(prog="python -m sparse_attn demo", description=__doc__.splitlines()[0])
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
    if min(args.layers, args.heads, args.kv_heads, args.hidden, args.vocab) < 1:
        parser.error("--layers, --heads, --kv-heads, --hidden and --vocab must be >= 1")
    if args.heads % args.kv_heads or args.hidden % args.heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads}) and --hidden "
                     f"({args.hidden}) a multiple of --heads")
    options = {k: v for k, v in (("dense_below", args.dense_below), ("dense_above", args.dense_above))
               if v is not None}
    from ..integrations.hf.state import check_options

    with input_errors("patch options", ValueError):
        options = check_options(options, has_config=args.pattern != "default")
    options.pop("pattern"), options.pop("on_layout")

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
    sah.patch(model, pattern_of(args.pattern), **options,
              on_layout=lambda layer, layout, density: densities.setdefault(layer, density))
    sparse_s, sparse_logits, sparse_new = run(model, ids, args.new_tokens)
    sah.unpatch(model)

    diff = (sparse_logits - dense_logits).abs().max().item()
    scale = dense_logits.abs().max().item()
    same = int((sparse_new == dense_new).sum())
    dense_below = options["dense_below"] if options["dense_below"] is not None else dense_below_for(ids.device)
    routes = layer_routes(args.layers, args.length, densities, dense_below, options["dense_above"])
    print()
    print("\n".join(format_routes(routes, densities, dense_s, sparse_s)))
    print(f"agreement  max |logit diff| over the prefill {diff:.3g} (max |logit| {scale:.3g}); "
          f"same new tokens {same}/{args.new_tokens}: sdpa {dense_new[0].tolist()} sparse {sparse_new[0].tolist()}")
    return 0
