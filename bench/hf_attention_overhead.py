"""What the one-route attention function costs against the code before it (run this file with each checkout on
PYTHONPATH, in turns): a 4-layer random Llama (hidden 512, 8 heads, 2 KV heads, fp32), eager prefill of --tokens
tokens patched with VerticalSlash(256, 512) (dense_below=0), and a generate of --new tokens after a --prompt-token
prompt with an all-ones attention mask (decode steps: exact dense attention over transformers' cache).  Each is
timed against the same model with `sdpa` in turns (warm, best of --repeats), so the printed ratios cancel the
machine's drift; compare the ratios between checkouts.  Not collected by pytest.

    PYTHONPATH=. python bench/hf_attention_overhead.py [--tokens 8192] [--prompt 2048] [--new 32] [--repeats 3]
"""
import argparse

import torch

from sparse_attn.tools.timing import time_in_turns
from sparse_attn.tools.tiny_model import tiny_llama


def main(argv=None):
    import sparse_attn as sa
    import sparse_attn.hf as sah

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model = tiny_llama(layers=4, hidden=512, heads=8, kv_heads=2, vocab=1024)
    gen = torch.Generator().manual_seed(0)
    long_ids = torch.randint(1, 1024, (1, args.tokens), generator=gen)
    prompt = torch.randint(1, 1024, (1, args.prompt), generator=gen)

    def prefill(patched):
        def call():
            sah.patch(model, sa.VerticalSlash(vertical=256, slash=512), dense_below=0) if patched else sah.unpatch(model)
            with torch.no_grad():
                model(long_ids, logits_to_keep=1, use_cache=False)
        return call

    def generate(patched):
        def call():
            sah.patch(model, dense_below=1 << 30) if patched else sah.unpatch(model)
            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        return call

    variants = {"prefill sdpa": prefill(False), "prefill VS": prefill(True),
                "generate sdpa": generate(False), "generate patched": generate(True)}
    timings = time_in_turns(variants, args.repeats)
    best = {name: timings.best(name) for name in variants}
    print(f"{sa.__file__}: torch threads {torch.get_num_threads()}, best of {args.repeats}")
    for what in ("prefill", "generate"):
        base, ours = best[f"{what} sdpa"], best[f"{what} {'VS' if what == 'prefill' else 'patched'}"]
        print(f"  {what:<9} sdpa {base:7.3f} s   patched {ours:7.3f} s   patched/sdpa {ours / base:6.3f}")


if __name__ == "__main__":
    main()
