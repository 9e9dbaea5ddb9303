"""Prefill of a tiny random-weight Llama (4 layers, hidden 512, 8 heads, 2 KV heads, fp32) at 16K tokens: one
forward with transformers' `sdpa` attention, patched with VerticalSlash(vertical=256, slash=512) on every head, and
patched with the default config (config=None).  Prints times and ratios.  Not collected by pytest.

    PYTHONPATH=. python bench/hf_prefill.py [--tokens 16384] [--repeats 1]
"""
import argparse
import time

import torch


def build_model(layers=4, hidden=512, heads=8, kv_heads=2, vocab=1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1 << 20)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def prefill_seconds(model, ids, repeats: int) -> tuple[float, float]:
    """Best (wall, process CPU) seconds of one prefill forward; CPU time is the steadier one on a shared machine."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        model(ids, logits_to_keep=1, use_cache=False)
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def main(argv=None):
    import sparse_attn as sa
    import sparse_attn.hf as sah

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many forwards per variant")
    args = parser.parse_args(argv)
    model = build_model()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    prefill_seconds(model, ids[:, :512], 1)                                  # warm-up
    densities = []
    variants = {"sdpa": lambda: sah.unpatch(model),
                "VS(256,512)": lambda: sah.patch(model, sa.VerticalSlash(vertical=256, slash=512)),
                "default": lambda: sah.patch(model, None, on_layout=lambda layer, layout, density:
                                             densities.append(density))}
    times = {name: (float("inf"), float("inf")) for name in variants}
    for _ in range(args.repeats):          # rounds over the variants, so drift of the machine hits all alike
        for name, switch in variants.items():
            switch()
            wall, cpu = prefill_seconds(model, ids, 1)
            times[name] = (min(times[name][0], wall), min(times[name][1], cpu))
    above = model._sparse_attn_state.options["dense_above"]
    sah.unpatch(model)
    if densities:
        print(f"default config: estimated densities {[round(d, 3) for d in densities]}; layers above "
              f"dense_above={above} ran dense")
    else:
        print("default config: every layer was sent to dense by the mass pre-check (diffuse attention)")
    print(f"tiny Llama (4 layers, hidden 512, 8 heads, 2 KV heads, fp32), {args.tokens} tokens, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"  {'variant':<12} {'wall s':>8} {'cpu s':>8} {'wall ratio':>11} {'cpu ratio':>10}   (ratio = sdpa / variant)")
    for name, (wall, cpu) in times.items():
        print(f"  {name:<12} {wall:8.2f} {cpu:8.2f} {times['sdpa'][0] / wall:10.2f}x {times['sdpa'][1] / cpu:9.2f}x")


if __name__ == "__main__":
    main()
