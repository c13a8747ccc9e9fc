"""Greedy generation on held-out prompts and its text metrics (BLEU, chrF, ROUGE-L, METEOR).

A held-out example (input_ids, labels) splits at its first labelled token: the tokens before it are
the prompt, the labelled tokens are the reference response (for chats, the first assistant turn and
what follows it, as labelled). The model continues the prompt greedily for up to
``max_new_tokens`` tokens (batched, left-padded); the continuation is cut at EOS and decoded.

Metrics come from the libraries people cite, not re-implementations: sacrebleu's corpus BLEU and chrF
(default settings: 13a tokenisation, chrF with character order 6, beta 2), and rouge-score's ROUGE-L
F-measure averaged over examples, and NLTK's METEOR with WordNet read from disk
(grads_ray/evaluation/meteor.py): where no WordNet is found, ``meteor`` is absent and
``meteor_absent`` says why.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from grads_ray.data.formats import IGNORE_INDEX


def split_prompt(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) -> (prompt ids, reference ids): the prompt ends before the first labelled
    token; the reference is every labelled token."""
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    return list(input_ids[:first]), [t for t, lab in zip(input_ids, labels, strict=True) if lab != IGNORE_INDEX]


def text_scores(predictions: list[str], references: list[str], wordnet: str = "none") -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu), mean ROUGE-L F1 (rouge-score) and, unless ``wordnet`` is
    ``none``, mean METEOR (NLTK) of predictions against one reference each. -> {"bleu", "chrf",
    "rougeL", "meteor"} on a 0-100 scale; "meteor" is replaced by "meteor_absent" (why) when no
    WordNet is found."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    bleu = BLEU().corpus_score(predictions, [references]).score
    chrf = CHRF().corpus_score(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True))
    out: dict[str, Any] = {"bleu": float(bleu), "chrf": float(chrf), "rougeL": 100.0 * rouge / len(predictions)}
    if wordnet != "none":
        from grads_ray.evaluation.meteor import meteor

        score, why = meteor(predictions, references, wordnet)
        out.update({"meteor": score} if score is not None else {"meteor_absent": why})
    return out


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                         eos_id: int | None, pad_id: int, device: torch.device | str = "cpu") -> tuple[list[list[int]], int]:
    """Greedy continuation of each prompt (left-padded batches), cut at EOS.
    -> (new token ids per prompt, tokens generated in all)."""
    model.eval()
    out: list[list[int]] = []
    generated = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            if p:
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
        seq = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_id)
        for row in seq[:, width:].tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id)]
            out.append(row)
            generated += len(row)
    return out, generated


def generation_metrics(model: torch.nn.Module, tokenizer: Any, examples: list[tuple[list[int], list[int]]],
                       max_new_tokens: int, batch_size: int, device: torch.device | str = "cpu",
                       wordnet: str = "none") -> dict[str, Any]:
    """Generate for held-out examples and score against their responses. -> text_scores plus
    ``generated_examples``, ``generated_tokens`` and ``generation_tokens_per_s``."""
    pairs = [split_prompt(ids, labels) for ids, labels in examples]
    pairs = [(p, r) for p, r in pairs if p and r]
    if not pairs or tokenizer is None:
        return {}
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    t0 = time.perf_counter()
    outs, n_tok = greedy_continuations(model, [p for p, _ in pairs], max_new_tokens, batch_size, eos, pad, device)
    secs = time.perf_counter() - t0
    preds = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    refs = [tokenizer.decode(r, skip_special_tokens=True).strip() for _, r in pairs]
    return {**text_scores(preds, refs, wordnet), "generated_examples": len(pairs), "generated_tokens": n_tok,
            "generation_tokens_per_s": round(n_tok / max(secs, 1e-9), 1)}
