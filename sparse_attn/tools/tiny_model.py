"""Small causal LMs built from their config classes with random weights (nothing downloaded): the Llama the demo,
the calibration command, the benchmarks and the tests run on (`tiny_llama`), and one model per family for the
model-family table (`tiny_causal_lm`, `FAMILIES`)."""
from __future__ import annotations

import torch
from ..errors import InvalidArgumentError

#: family -> (config class, causal-LM class, config fields beyond the shared sizes).  Sliding windows and Gemma-2's
#: softcap are small on purpose, so that a prompt of a few hundred tokens crosses the window and the cap changes
#: the scores (with Gemma-2's larger initial weights, 0.2, the cap moves its logits by about 10%; at 0.02 by 4e-7).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 48}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),      # its default pad id is past a tiny vocab
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


def tiny_causal_lm(family: str = "llama", layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                   vocab: int = 512, *, seed: int = 0, init_std: float | None = None, intermediate: int | None = None,
                   max_positions: int = 1 << 20, attn_implementation: str = "sdpa", **fields):
    """A ``family`` causal LM (`FAMILIES`) in eval mode: ``layers`` decoder layers of width ``hidden``, ``heads``
    query heads and ``kv_heads`` key/value heads, MLP width ``intermediate`` (default 2 x hidden), weights drawn
    from N(0, ``init_std``) (default: the family's, else 0.02) under ``torch.manual_seed(seed)``; ``fields``
    override config fields.  ``attn_implementation="sdpa"`` on a model without sdpa (Gemma-2) gives ``eager``."""
    import transformers

    if family not in FAMILIES:
        raise InvalidArgumentError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    config_name, model_name, family_fields = FAMILIES[family]
    fields = {"initializer_range": 0.02, **family_fields, **fields}
    if init_std is not None:
        fields["initializer_range"] = init_std
    if fields.get("layer_types") == "alternating":          # sliding, full, sliding, ... (Gemma-2's own order)
        fields["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    config = getattr(transformers, config_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions, **fields)
    model_cls = getattr(transformers, model_name)
    if attn_implementation == "sdpa" and not getattr(model_cls, "_supports_sdpa", True):
        attn_implementation = "eager"
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tiny_llama(layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2, vocab: int = 512, *,
               seed: int = 0, init_std: float = 0.02, intermediate: int | None = None,
               max_positions: int = 1 << 20, attn_implementation: str = "sdpa"):
    """``LlamaForCausalLM`` in eval mode (`tiny_causal_lm` of the ``"llama"`` family): head dim
    ``hidden // heads``, weights drawn from N(0, ``init_std``) under ``torch.manual_seed(seed)``."""
    return tiny_causal_lm("llama", layers, hidden, heads, kv_heads, vocab, seed=seed, init_std=init_std,
                          intermediate=intermediate, max_positions=max_positions,
                          attn_implementation=attn_implementation)
