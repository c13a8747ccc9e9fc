"""The demo's tokenizer (byte-level BPE trained here) and small Llama-style model (built from a config,
then pre-trained briefly on general text, so that the demo's forgetting and generation lines measure
a model that knew something before its fine-tune).

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
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
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


def pretrain(model, tokenizer, text: str, *, tokens: int, block: int = 128, batch: int = 16, lr: float = 3e-3,
             seed: int = 0) -> dict:
    """Causal-LM training of ``model`` on ``text`` cut into ``block``-token blocks, in this process
    (plain PyTorch: AdamW, linear warm-up then cosine decay), until about ``tokens`` tokens are seen.
    Blocks are shuffled by ``seed``. -> {steps, tokens, first_loss, last_loss, seconds}."""
    import math
    import time

    import numpy as np
    import torch

    t0 = time.time()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = np.array([ids[i:i + block] for i in range(0, len(ids) - block + 1, block)], dtype=np.int64)
    if not len(blocks):
        raise ValueError(f"pre-training text of {len(ids)} tokens: less than one block of {block}")
    steps = max(1, tokens // (block * batch))
    order = np.concatenate([np.random.default_rng(seed + e).permutation(len(blocks))
                            for e in range(-(-steps * batch // len(blocks)))])
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model.train()
    losses = []
    for step in range(steps):
        x = torch.from_numpy(blocks[order[step * batch:(step + 1) * batch]])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "tokens": steps * batch * block, "first_loss": round(losses[0], 3),
            "last_loss": round(sum(tail) / len(tail), 3), "seconds": round(time.time() - t0, 1)}


def build_demo_model(out_dir: str | Path, texts: Iterable[str], seed: int = 0, pretrain_text: str = "",
                     pretrain_tokens: int = 0, **model_kwargs) -> dict:
    """Train the tokenizer (on ``texts`` and ``pretrain_text``), build the model, pre-train it on
    ``pretrain_text`` for about ``pretrain_tokens`` tokens (0: random weights), save both under
    ``out_dir``. -> what was done (parameters, pre-training figures)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(texts)
    tokenizer = train_tokenizer([*texts, *pretrain_text.split("\n\n")] if pretrain_text else texts)
    model = build_model(tokenizer, seed=seed, **model_kwargs)
    info = {"params": sum(p.numel() for p in model.parameters())}
    if pretrain_text and pretrain_tokens:
        info["pretrain"] = pretrain(model, tokenizer, pretrain_text, tokens=pretrain_tokens, seed=seed)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the demo's output
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return info
