"""Small random-weight transformers models built from their config classes (nothing downloaded): the demo's Llama,
the calibration tests' models and the model-family table (`bench/hf_families.py`) all come from here.

``build_model(layers, hidden, heads, kv_heads, vocab, seed, family="llama")`` builds one; `FAMILIES` maps a family
name to its (config class, model class) names in transformers and the config fields it needs beyond the shared ones
(the shared ones: vocabulary, hidden and MLP sizes, layers, query and KV heads, positions, pad token 0).
"""
from __future__ import annotations

import torch

#: family -> (config class, causal-LM class, extra config fields).  Sliding windows and Gemma-2's softcap are set
#: small on purpose so that a prompt of a few hundred tokens crosses the window and the cap changes the scores
#: (with Gemma-2's larger initial weights, 0.2, the cap moves its logits by about 10%; at 0.02 by 4e-7).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 48}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 48,
                                                    "attn_logit_softcapping": 2.0, "initializer_range": 0.2}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 48,
                                                        "layer_types": "alternating"}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                           "moe_intermediate_size": 64,
                                                           "shared_expert_intermediate_size": 64}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
}


def model_config(family: str, *, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int,
                 max_positions: int = 1 << 20, **extra):
    """The transformers config of a small ``family`` model (see `FAMILIES`); ``extra`` overrides fields."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    config_name, _, fields = FAMILIES[family]
    fields = {**fields, **extra}
    if fields.get("layer_types") == "alternating":          # sliding, full, sliding, ... (Gemma-2's own order)
        fields["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    config = getattr(transformers, config_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **fields)
    return config


def build_model(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
                seed: int = 0, *, family: str = "llama", attn_implementation: str = "sdpa", **extra):
    """A ``family`` causal LM with random weights (seeded), in eval mode, with ``attn_implementation`` attention
    (Gemma-2 has no `sdpa`: it gets `eager`)."""
    import transformers

    config = model_config(family, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab, **extra)
    model_cls = getattr(transformers, FAMILIES[family][1])
    if attn_implementation == "sdpa" and not getattr(model_cls, "_supports_sdpa", True):
        attn_implementation = "eager"
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_cls(config).eval()
