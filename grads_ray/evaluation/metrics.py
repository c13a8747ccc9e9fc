"""Held-out losses before/after fine-tuning (pure torch): domain response loss and general-text loss.

domain_loss: token-weighted mean cross-entropy over the response tokens of held-out SFT examples.
general_loss: mean next-token cross-entropy over consecutive ``block_size``-token blocks of plain text.
Forgetting is the relative change of general loss: (after - before) / before.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]], batch_size: int,
                    device: torch.device | str = "cpu") -> tuple[float, int]:
    """Token-weighted mean loss over (input_ids, labels) examples. -> (loss, tokens counted)."""
    from grads_ray.data.batching import pad_batch
    from grads_ray.training.recipe import token_loss

    model.eval()
    pad_id = model.config.pad_token_id or 0
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids, lab, mask = pad_batch([x for x, _ in chunk], [y for _, y in chunk], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        loss, n = token_loss(logits, lab.to(device))
        total += loss.item() * n
        count += n
    return (total / count if count else math.nan), count


def text_blocks(token_ids: list[int], block_size: int, max_blocks: int) -> list[tuple[list[int], list[int]]]:
    """Plain-text token stream -> up to ``max_blocks`` (ids, labels) blocks, every token labelled."""
    blocks = []
    for start in range(0, len(token_ids) - 1, block_size):
        block = token_ids[start:start + block_size]
        if len(block) >= 2:
            blocks.append((block, list(block)))
        if len(blocks) >= max_blocks:
            break
    return blocks


def evaluate_model(model_path: str, domain: list[tuple[list[int], list[int]]], general_text: str | None,
                   block_size: int, max_blocks: int, batch_size: int, use_gpu: bool = False,
                   generate: int = 0, max_new_tokens: int = 64, wordnet: str = "none") -> dict[str, float]:
    """Domain and general-text loss (and perplexity) of one checkpoint; with ``generate`` > 0, greedy
    continuations of the first ``generate`` held-out prompts scored against their responses (BLEU,
    chrF, ROUGE-L, and METEOR with WordNet from ``wordnet``; grads_ray/evaluation/generation.py)."""
    from transformers import AutoModelForCausalLM

    from grads_ray.data.tokenize import load_tokenizer

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    from grads_ray.storage import local_model

    model = AutoModelForCausalLM.from_pretrained(local_model(model_path), dtype=torch.float32,
                                                 use_safetensors=True).to(device)
    out: dict[str, float] = {}
    if domain:
        loss, n = mean_token_loss(model, domain, batch_size, device)
        out.update(domain_loss=loss, domain_ppl=math.exp(loss), domain_tokens=n)
    tok = load_tokenizer(model_path)
    if general_text and tok is not None:
        ids = tok(general_text, add_special_tokens=False)["input_ids"]
        loss, n = mean_token_loss(model, text_blocks(ids, block_size, max_blocks), batch_size, device)
        out.update(general_loss=loss, general_ppl=math.exp(loss), general_tokens=n)
    if generate > 0 and domain and tok is not None:
        from grads_ray.evaluation.generation import generation_metrics

        out.update(generation_metrics(model, tok, domain[:generate], max_new_tokens, batch_size, device, wordnet))
    return out


def forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Relative changes after/before: negative domain change = learned; positive general change = forgot."""
    out = {}
    for key in ("domain_loss", "general_loss"):
        if key in before and key in after and before[key]:
            out[f"{key}_rel_change"] = (after[key] - before[key]) / before[key]
    for key in ("bleu", "chrf", "rougeL", "meteor"):  # generation scores: the change in points (positive = learned)
        if key in before and key in after:
            out[f"{key}_change"] = after[key] - before[key]
    if "general_loss_rel_change" in out:
        out["forgetting"] = out["general_loss_rel_change"]
    return out


__all__ = ["evaluate_model", "forgetting", "mean_token_loss", "text_blocks"]
