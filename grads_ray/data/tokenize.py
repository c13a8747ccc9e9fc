"""Examples -> ``(input_ids, labels)`` with the prompt masked (labels -100), Hugging Face convention.

Labels have the length of ``input_ids``; the model shifts them by one, so a label at position t is
predicted from tokens < t. Only response tokens (assistant turns for chat) carry loss.
:func:`tokenize_batch` does it for a batch of ingested rows (scoring and training read the same
tokens), :func:`tokenize` over a Ray Data dataset of them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from grads_ray.data.formats import IGNORE_INDEX, Example, RowError, normalize

# Used where a tokenizer has no chat template of its own; the demo tokenizer ships the same one.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer saved beside the model, or None when the folder has none (pre-tokenized input)."""
    from transformers import AutoTokenizer

    try:
        from grads_ray.storage import local_model

        return AutoTokenizer.from_pretrained(local_model(model_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None


def _special(tokenizer: Any, name: str) -> list[int]:
    tid = getattr(tokenizer, f"{name}_token_id", None)
    return [tid] if tid is not None else []


def encode_pair(prompt: str, response: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``[bos] prompt response [eos]``; prompt and bos masked. Tokenized apart, so no token spans both."""
    p = _special(tokenizer, "bos") + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + _special(tokenizer, "eos")
    return p + r, [IGNORE_INDEX] * len(p) + r


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss.

    An assistant turn j spans from the end of ``render(messages[:j], generation prompt)`` to the end of
    ``render(messages[:j+1])``, so the end-of-turn marker is learned too. Templates that are not
    prefix-stable fall back to locating the turn's content in the text.
    """
    full = _render(tokenizer, messages, False)
    spans, cursor = [], 0
    for j, msg in enumerate(messages):
        if msg["role"] != "assistant" or not msg["content"]:
            continue
        head = _render(tokenizer, messages[:j], True) if j else ""
        upto = _render(tokenizer, messages[: j + 1], False)
        if full.startswith(upto) and upto.startswith(head) and len(head) >= cursor:
            spans.append((len(head), len(upto)))
            cursor = len(upto)
            continue
        at = full.find(msg["content"], cursor)
        if at < 0:
            raise RowError("chat_template", f"assistant turn {j} not found in the rendered text")
        spans.append((at, at + len(msg["content"])))
        cursor = at + len(msg["content"])
    return full, spans


def encode_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (a, b) in zip(ids, offsets, strict=True):
        inside = b > a and any(s <= a and b <= e for s, e in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return list(ids), labels


def encode(example: Example, tokenizer: Any | None, max_length: int, on_long: str,
           info: dict[str, Any] | None = None) -> tuple[list[int], list[int]]:
    """One example -> ``(input_ids, labels)`` within ``max_length``.

    ``on_long="truncate"`` keeps the first ``max_length`` tokens (``info["truncated_from"]`` gets
    the full length, when ``info`` is given); ``"reject"`` raises ``too_long``. Either way an
    example left with no loss token raises ``empty_response``.
    """
    if example.kind == "tokens":
        ids, labels = list(example.input_ids), list(example.labels)
    elif tokenizer is None:
        raise RowError("no_tokenizer", "text rows need a tokenizer in the model folder")
    elif example.kind == "pair":
        ids, labels = encode_pair(example.prompt, example.response, tokenizer)
    else:
        ids, labels = encode_chat(example.messages, tokenizer)
    if len(ids) > max_length:
        if on_long == "reject":
            raise RowError("too_long", f"{len(ids)} tokens > max_length {max_length}")
        if info is not None:
            info["truncated_from"] = len(ids)
        ids, labels = ids[:max_length], labels[:max_length]
    if not any(lab != IGNORE_INDEX for lab in labels[1:]):
        raise RowError("empty_response", "no response token left to learn from")
    return ids, labels


@dataclass
class Encoded:
    """Small side files (held-out rows, a target set) tokenized: ``examples`` as ``(input_ids,
    labels)``, their ``ids``, and how many rows were ``rejected``."""

    examples: list[tuple[list[int], list[int]]]
    ids: list[str]
    rejected: int


def encode_files(paths: list[str], model_path: str, max_length: int, on_long: str,
                 trust_remote_code: bool = False) -> Encoded:
    """Every row of ``paths`` (the corpus's formats) encoded in this process; a bad row is counted,
    not raised."""
    from grads_ray.data.formats import normalize, row_id
    from grads_ray.data.readers import plan_shards, read_shard

    out = Encoded([], [], 0)
    if not paths:
        return out
    tok = load_tokenizer(model_path, trust_remote_code)
    for shard in plan_shards(paths, 1 << 40, 1 << 40):
        for raw in read_shard(shard):
            try:
                if raw.error:
                    raise raw.error
                out.examples.append(encode(normalize(raw.record), tok, max_length, on_long))
                out.ids.append(row_id(raw.record, f"{raw.source}:{raw.line}"))
            except RowError:
                out.rejected += 1
    return out


def tokenize_batch(batch: dict[str, np.ndarray], model_path: str, max_length: int, on_long: str,
                   trust_remote_code: bool = False) -> dict[str, Any]:
    """Rows -> ``input_ids``/``labels`` (lists) or a reject ``reason``. Stateless; the tokenizer is
    cached per worker process."""
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    ids_out, labels_out, reasons, details, truncated = [], [], [], [], []
    for record in batch["record"]:
        info: dict[str, Any] = {}
        try:
            ids, labels = encode(normalize(json.loads(record)), tokenizer, max_length, on_long, info)
            reason = detail = ""
        except RowError as err:
            ids, labels, reason, detail = [], [], err.reason, err.detail
        truncated.append("truncated_from" in info)
        ids_out.append(np.asarray(ids, dtype=np.int64))
        labels_out.append(np.asarray(labels, dtype=np.int64))
        reasons.append(reason)
        details.append(detail)
    keep = {k: batch[k] for k in ("id", "shard", "source", "line", "pos") if k in batch}
    return {**keep, "input_ids": ids_out, "labels": labels_out, "reason": np.array(reasons, dtype=object),
            "detail": np.array(details, dtype=object), "truncated": np.array(truncated, dtype=bool)}


def tokenize(ds, *, model_path: str, max_length: int, on_long: str, batch_size: int, trust_remote_code: bool = False):
    """Add ``input_ids``/``labels`` (or a reject ``reason``) to a dataset of rows, in CPU tasks."""
    return ds.map_batches(tokenize_batch, batch_size=batch_size, batch_format="numpy",
                          fn_kwargs={"model_path": model_path, "max_length": max_length, "on_long": on_long,
                                     "trust_remote_code": trust_remote_code})
