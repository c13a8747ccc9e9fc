"""The demo's tokenizer (byte-level BPE trained here) and small Llama-style model (built from a config).

Both are written with ``save_pretrained`` (safetensors), so the job loads them through the same
``from_pretrained`` path as any local Hugging Face checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from grads_ray.data.tokenize import FALLBACK_CHAT_TEMPLATE

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Byte-level BPE over ``texts`` -> a ``PreTrainedTokenizerFast`` with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2,
        special_tokens=list(SPECIAL.values()) + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL,
                                   additional_special_tokens=ROLE_TOKENS)
    fast.chat_template = FALLBACK_CHAT_TEMPLATE
    return fast


def build_model(tokenizer, *, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 1024, seed: int = 0):
    """A small randomly initialised ``LlamaForCausalLM`` sized for CPU demos (~0.7M parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_demo_model(out_dir: str | Path, texts: Iterable[str], seed: int = 0, **model_kwargs) -> str:
    """Train the tokenizer, build the model, save both under ``out_dir``. -> the folder's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts)
    model = build_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
