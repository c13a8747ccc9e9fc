"""Tiny causal LMs of the model families users fine-tune, built from each family's own config class in
the installed transformers (small dims, random weights), for the exactness matrix
(tests/test_model_families.py) and the coverage table (benchmarks/model_coverage.py ->
docs/model_coverage.md).

Each family's config takes the shared small sizes wherever its constructor has such a key; a few need
more (MLA's head dims, a vocabulary past their special ids, every layer of a kind). ``FAMILIES`` lists
the ones this project checks, each with what is special about it for the engine.
"""

from __future__ import annotations

import inspect

import torch

VOCAB = 97

SMALL = dict(vocab_size=VOCAB, hidden_size=32, n_embd=32, d_model=32, intermediate_size=48, n_inner=48, ffn_dim=48,
             num_hidden_layers=2, n_layer=2, num_layers=2, num_attention_heads=4, n_head=4, num_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, n_positions=128,
             num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             shared_expert_intermediate_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             hidden_dropout=0.0, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout=0.0)

# family -> (what it exercises, extra config keys)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("RMSNorm, GQA, SwiGLU", {}),
    "mistral": ("sliding-window attention", {}),
    "qwen2": ("q/k/v biases", {}),
    "qwen3": ("per-head q/k RMSNorm on (B, T, heads, head_dim)", {}),
    "phi3": ("fused qkv and gate_up projections", {}),
    "olmo2": ("q/k norms over all heads, post-norms", {}),
    "granite": ("embedding, residual and logit multipliers", {}),
    "starcoder2": ("LayerNorm with bias, biases everywhere", {}),
    "gpt_neox": ("parallel residual, fused qkv", {}),
    "gpt2": ("Conv1D, tied head, learned positions", {}),
    "falcon": ("fused qkv, parallel attention", {}),
    "gemma": ("embedding scaled by sqrt(d), (1 + w) RMSNorm, tied head", {}),
    "gemma2": ("logit soft-capping, sandwich norms", {}),
    "gemma3_text": ("per-head q/k norms on (B, heads, T, head_dim), local/global layers", {}),
    "opt": ("learned positions from the attention mask with an offset, flattened-token MLP", {}),
    "cohere": ("LayerNorm without bias, parallel block, logit scale", {}),
    "stablelm": ("partial rotary, LayerNorm", {}),
    "bloom": ("ALiBi, embedding LayerNorm", {}),
    "gptj": ("parallel block, rotary on part of the head", {"rotary_dim": 4}),
    "smollm3": ("layers without positions (NoPE)", {}),
    "phi": ("partial rotary, dense attention biases", {}),
    "glm4": ("post-norms, fused gate_up", {}),
    "exaone4": ("per-head q/k norms, hybrid attention", {}),
    "biogpt": ("scaled embedding, learned positions with an offset", {}),
    "ctrl": ("in-place scaled embedding, sinusoidal positions", {}),
    "diffllama": ("differential attention: lambda vectors (replay rule)", {}),
    "mixtral": ("MoE: 3-D experts, top-k router on flattened tokens", {}),
    "qwen2_moe": ("MoE with a shared expert and its sigmoid gate", {}),
    "qwen3_moe": ("MoE with per-head q/k norms", {}),
    "olmoe": ("MoE with q/k norms", {}),
    "deepseek_v3": ("MoE with shared experts, group-limited routing, MLA attention",
                    {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                     "v_head_dim": 8, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
                     "n_shared_experts": 1, "num_key_value_heads": 4}),
    "gpt_oss": ("MoE with expert biases, transposed expert weights, clamped gate, attention sinks", {}),
}

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")


def family_config(family: str, vocab: int = VOCAB):
    """The tiny config of one family, from its config class's own constructor."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[family]
    accepted = inspect.signature(cls.__init__).parameters
    keys = {k: v for k, v in {**SMALL, "vocab_size": vocab}.items()
            if k in accepted or k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                      "pad_token_id", "bos_token_id", "eos_token_id")}
    return cls(**{**keys, **FAMILIES.get(family, ("", {}))[1]})


def build_family(family: str, path, vocab: int = VOCAB, seed: int = 0):
    """A tiny random model of ``family``, saved with ``save_pretrained`` (safetensors) and loaded back
    the way the job loads a model folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, vocab))
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def eager_experts(model):
    """MoE layers through their eager per-expert loop: the grouped-matmul default has no float64 kernel."""
    try:
        model.set_experts_implementation("eager")
    except (AttributeError, ValueError):  # not a MoE model
        pass
    return model
