"""Prefill of a tiny random-weight Llama (4 layers, hidden 512, 8 heads, 2 KV heads, fp32) at 16K tokens: one
forward with transformers' `sdpa` attention, patched with VerticalSlash(vertical=256, slash=512) on every head, and
patched with the default config (config=None).  Prints times and ratios.  Not collected by pytest.

    PYTHONPATH=. python bench/hf_prefill.py [--tokens 16384] [--repeats 2]
"""
import argparse

import torch

from sparse_attn.tools.timing import time_in_turns
from sparse_attn.tools.tiny_model import tiny_llama


def prefill(model, ids):
    with torch.no_grad():
        model(ids, logits_to_keep=1, use_cache=False)


def main(argv=None):
    import sparse_attn as sa
    import sparse_attn.hf as sah

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up round)")
    args = parser.parse_args(argv)
    model = tiny_llama(layers=4, hidden=512, heads=8, kv_heads=2, vocab=1024)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    densities = []
    variants = {"sdpa": lambda: sah.unpatch(model),
                "VS(256,512)": lambda: sah.patch(model, sa.VerticalSlash(vertical=256, slash=512)),
                "default": lambda: sah.patch(model, None, on_layout=lambda layer, layout, density:
                                             densities.append(density))}

    def run_as(switch):
        def call():
            switch()
            prefill(model, ids)
        return call

    # variants in turns, warm (one untimed round first), best of --repeats rounds
    timings = time_in_turns({name: run_as(switch) for name, switch in variants.items()}, args.repeats)
    times = {name: timings.best(name) for name in variants}
    above = model._sparse_attn_state.options["dense_above"]
    sah.unpatch(model)
    if densities:
        print(f"default config: estimated densities {[round(d, 3) for d in densities]}; layers above "
              f"dense_above={above} ran dense")
    else:
        print("default config: every layer was sent to dense by the mass pre-check (diffuse attention)")
    print(f"tiny Llama (4 layers, hidden 512, 8 heads, 2 KV heads, fp32), {args.tokens} tokens, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"  {'variant':<12} {'wall s':>8} {'ratio':>8}   (ratio = sdpa / variant)")
    for name, seconds in times.items():
        print(f"  {name:<12} {seconds:8.2f} {times['sdpa'] / seconds:7.2f}x")


if __name__ == "__main__":
    main()
