"""Row shapes of an SFT corpus, recognised and validated.

Every raw row becomes one :class:`Example` or raises :class:`RowError` with a short machine-readable
reason (``missing_field:response``, ``empty_response``, ...). Nothing here touches files or Ray.

Accepted shapes:
- ``{"prompt", "response"}`` (also ``completion`` for ``response``);
- Alpaca ``{"instruction", "input"?, "output"}``;
- chat ``{"messages": [{"role", "content"}, ...]}`` with at least one non-empty assistant turn;
- pre-tokenized ``{"input_ids": [...], "labels": [...]}`` (same length, -100 where no loss).
An optional ``id`` (string or integer) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """A row that cannot become an example; ``reason`` is short and stable (used in rejected.jsonl)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Example:
    """One SFT example in canonical form. Exactly one of the three payloads is set, per ``kind``."""

    kind: str  # "pair" | "chat" | "tokens"
    prompt: str | None = None
    response: str | None = None
    messages: list[dict[str, str]] | None = None
    input_ids: list[int] | None = None
    labels: list[int] | None = None


def _text(row: dict[str, Any], name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if name not in row or row[name] is None:
        if required:
            raise RowError(f"missing_field:{name}")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise RowError(f"wrong_type:{name}", f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"empty_{name}")
    return value


def _int_list(row: dict[str, Any], name: str) -> list[int]:
    value = row.get(name)
    if value is None:
        raise RowError(f"missing_field:{name}")
    if hasattr(value, "tolist"):  # numpy / arrow arrays from Parquet
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RowError(f"wrong_type:{name}", "expected a list of integers")
    return value


def detect_kind(row: dict[str, Any]) -> str:
    """The row's shape from the fields it has; raises ``unknown_format`` when none fits."""
    if "messages" in row:
        return "chat"
    if "input_ids" in row:
        return "tokens"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row or "response" in row or "completion" in row:
        return "pair"
    raise RowError("unknown_format", f"fields {sorted(row)[:8]} match no accepted shape")


def _chat(row: dict[str, Any]) -> Example:
    messages = row["messages"]
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise RowError("wrong_type:messages", "expected a non-empty list")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RowError("wrong_type:messages", f"message {i} is not an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in CHAT_ROLES:
            raise RowError("bad_role", f"message {i} has role {role!r}")
        if not isinstance(content, str):
            raise RowError("wrong_type:content", f"message {i} content is {type(content).__name__}")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
        raise RowError("empty_response", "no non-empty assistant message")
    return Example(kind="chat", messages=clean)


def _tokens(row: dict[str, Any]) -> Example:
    input_ids = _int_list(row, "input_ids")
    labels = _int_list(row, "labels") if "labels" in row else list(input_ids)
    if not input_ids:
        raise RowError("empty_input_ids")
    if len(labels) != len(input_ids):
        raise RowError("length_mismatch", f"{len(input_ids)} input_ids vs {len(labels)} labels")
    # The model shifts labels by one, so position 0 never carries loss.
    if not any(lab != IGNORE_INDEX for lab in labels[1:]):
        raise RowError("empty_response", "every label is -100")
    return Example(kind="tokens", input_ids=input_ids, labels=labels)


def normalize(row: Any) -> Example:
    """Raw row (already JSON-decoded) -> canonical :class:`Example`, or :class:`RowError`."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"got {type(row).__name__}")
    kind = detect_kind(row)
    if kind == "chat":
        return _chat(row)
    if kind == "tokens":
        return _tokens(row)
    if kind == "alpaca":
        instruction = _text(row, "instruction")
        extra = _text(row, "input", required=False, allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(kind="pair", prompt=prompt, response=_text(row, "output"))
    response_key = "response" if "response" in row or "completion" not in row else "completion"
    return Example(kind="pair", prompt=_text(row, "prompt"), response=_text(row, response_key))


def row_id(row: dict[str, Any], fallback: str) -> str:
    """The row's own ``id`` when it has a usable one, else the stable ``file:line`` fallback."""
    value = row.get("id") if isinstance(row, dict) else None
    if value is None:
        return fallback
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError("wrong_type:id", f"expected a string or integer, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise RowError("empty_id")
    return text
