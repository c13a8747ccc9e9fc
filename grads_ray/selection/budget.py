"""Budgets: "5%" or "0.05" (fraction of scored examples), "500" (examples), "20000 tokens"."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

_TOKENS = re.compile(r"^\s*(\d[\d_]*)\s*(tokens?|tok)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    kind: str  # fraction | count | tokens
    value: float

    def describe(self) -> str:
        if self.kind == "fraction":
            return f"{self.value:.4g} of the scored examples"
        return f"{int(self.value)} {'examples' if self.kind == 'count' else 'tokens'}"


def parse_budget(text: str | float | int) -> Budget:
    """Read a budget; raises ValueError with the accepted forms."""
    raw = str(text).strip()
    if m := _TOKENS.match(raw):
        return Budget("tokens", int(m.group(1).replace("_", "")))
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100
            kind = "fraction"
        elif re.fullmatch(r"\d[\d_]*", raw):
            return Budget("count", int(raw.replace("_", "")))
        else:
            value, kind = float(raw), "fraction"
    except ValueError:
        raise ValueError(f"cannot read budget {raw!r}: use '5%', '0.05', '500' or '20000 tokens'") from None
    if not 0 < value <= 1:
        raise ValueError(f"a fractional budget must be in (0, 1], got {raw!r}")
    return Budget(kind, value)


def take_within_budget(order: np.ndarray, n_tokens: np.ndarray, budget: Budget, n_total: int) -> np.ndarray:
    """The prefix of ``order`` (indices, best first) that the budget pays for.

    Fractions count examples, rounded up, out of ``n_total``; a token budget takes candidates in
    order and skips any that no longer fits. -> selected indices in rank order.
    """
    if budget.kind in ("fraction", "count"):
        k = math.ceil(budget.value * n_total) if budget.kind == "fraction" else int(budget.value)
        return order[:k]
    cost = n_tokens[order]
    left, keep = int(budget.value), []
    for i, c in zip(order.tolist(), cost.tolist(), strict=True):
        if c <= left:
            keep.append(i)
            left -= c
    return np.asarray(keep, dtype=np.int64)
