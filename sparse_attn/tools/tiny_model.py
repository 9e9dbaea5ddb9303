"""A small Llama built from a config with random weights (nothing downloaded): the model the demo, the calibration
command, the benchmarks and the tests run on."""
from __future__ import annotations

import torch


def tiny_llama(layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2, vocab: int = 512, *,
               seed: int = 0, init_std: float = 0.02, intermediate: int | None = None,
               max_positions: int = 1 << 20, attn_implementation: str = "sdpa"):
    """``LlamaForCausalLM`` in eval mode: ``layers`` decoder layers of width ``hidden``, ``heads`` query heads and
    ``kv_heads`` key/value heads (head dim ``hidden // heads``), MLP width ``intermediate`` (default 2 x hidden),
    weights drawn from N(0, ``init_std``) under ``torch.manual_seed(seed)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, initializer_range=init_std)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
