"""Planted noise for curation experiments: a documented share of SFT pairs made bad on purpose, so
that a selection method has something to find and its choice can be scored.

Two kinds, on disjoint rows chosen by a seeded generator:

- ``swapped``: the response belongs to another prompt (the chosen rows pass their responses round a
  cycle, so every one of them gets a response that is not its own);
- ``truncated``: the response is cut to its first ``keep`` share (at least ``min_chars``), at a word
  boundary where there is one.

Rows in, rows out (dicts with ``id``, ``prompt``, ``response``), plus ``{id: kind}``; nothing else
changes, and a row's id stays, so the list of planted rows is the ground truth.
"""

from __future__ import annotations

import numpy as np


def truncate_text(text: str, keep: float = 0.15, min_chars: int = 20) -> str:
    """The first ``keep`` share of ``text`` (at least ``min_chars``, never all of it when it is longer),
    cut back to the last blank before that point when there is one."""
    n = max(min_chars, int(len(text) * keep))
    if n >= len(text):
        n = max(1, len(text) // 2)
    cut = text.rfind(" ", 0, n + 1)
    return text[: cut if cut > 0 else n].rstrip()


def plant_noise(rows: list[dict], swapped: float, truncated: float, seed: int,
                keep: float = 0.15) -> tuple[list[dict], dict[str, str]]:
    """Copies of ``rows`` with ``round(swapped * N)`` responses swapped and ``round(truncated * N)``
    cut short (disjoint sets). -> (rows, {id: "swapped" | "truncated"})."""
    n = len(rows)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    k_swap, k_trunc = int(round(swapped * n)), int(round(truncated * n))
    if k_swap + k_trunc > n:
        raise ValueError(f"cannot plant {k_swap} + {k_trunc} noisy rows among {n}")
    if k_swap == 1:
        k_swap = 0  # a single row has nobody to swap with
    swap, trunc = order[:k_swap], order[k_swap:k_swap + k_trunc]
    out = [dict(r) for r in rows]
    kinds: dict[str, str] = {}
    for a, b in zip(swap, np.roll(swap, -1), strict=True):  # a takes b's response: a cycle
        out[a]["response"] = rows[b]["response"]
        kinds[rows[a]["id"]] = "swapped"
    for i in trunc:
        out[i]["response"] = truncate_text(rows[i]["response"], keep)
        kinds[rows[i]["id"]] = "truncated"
    return out, kinds
