"""A tiny random-weight Llama generates from a long prompt with retrieval decode (RetrievalCache, small device
window) and with dense SDPA + DynamicCache; prints prefill/decode times, memory per tier, and token agreement.

    PYTHONPATH=. python bench/retrieval_hf_generate.py --context 65536 --new 16
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers

from sparse_attn.integrations.hf.decode_cache import RetrievalCache, register


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--context", type=int, default=65536)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--index", default="query_aware")
    p.add_argument("--no-dense", action="store_true")
    args = p.parse_args(argv)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=args.context + args.new + 8)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 97, (1, args.context), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=args.new, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)

    def timed(**extra):
        """generate with a logits processor stamping each step: (tokens, prefill s, median decode step s)."""
        stamps = []

        def stamp(input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(ids, **kw, logits_processor=transformers.LogitsProcessorList([stamp]), **extra)
        steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
        return out, stamps[0] - start, steps[len(steps) // 2] if steps else float("nan")

    model.set_attn_implementation(register())
    cache = RetrievalCache(config, top_k=args.top_k, sink=args.sink, window=args.window, index=args.index)
    out, prefill_s, step_s = timed(cache=cache)
    report = {k: round(v / 2 ** 20, 1) for k, v in cache.memory_report().items()}
    print(f"retrieval ({args.index}, top_k {args.top_k}, sink {args.sink}, window {args.window}): context "
          f"{args.context}, prefill {prefill_s:.1f} s (incl. first index build), decode step {step_s * 1e3:.1f} ms "
          f"(median); MiB per tier {report}")
    if not args.no_dense:
        model.set_attn_implementation("sdpa")
        ref, dense_prefill_s, dense_step_s = timed()
        same = (out[0, args.context:] == ref[0, args.context:]).tolist()
        first_diff = same.index(False) if False in same else None
        print(f"dense sdpa + DynamicCache: prefill {dense_prefill_s:.1f} s, decode step {dense_step_s * 1e3:.1f} ms; "
              f"identical new tokens {sum(same)}/{args.new}, "
              f"first difference at {first_diff}")


if __name__ == "__main__":
    main()
