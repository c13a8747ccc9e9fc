"""Budgets: "5%" or "0.05" (fraction of scored examples), "500" (examples), "20000 tokens".

A budget is spent by walking an order (best first): examples cost 1 each under a fraction or count
budget, and their token count under a token budget, where a candidate that no longer fits is
skipped and a later, shorter one may still fit. Per-group limits (per-source quotas) are spent the
same way. Vectorised: a prefix sum finds where the budget first overflows; only candidates small
enough to still fit after that point are walked one by one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from grads_ray.selection.ranking import ceil_fraction, split_evenly

_TOKENS = re.compile(r"^\s*(\d[\d_]*)\s*(tokens?|tok)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    kind: str  # fraction | count | tokens
    value: float

    def describe(self) -> str:
        if self.kind == "fraction":
            return f"{self.value:.4g} of the scored examples"
        return f"{int(self.value)} {'examples' if self.kind == 'count' else 'tokens'}"

    def limit(self, n_total: int) -> int:
        """What the budget allows: examples (fraction rounded up, or count) or tokens."""
        return ceil_fraction(self.value, n_total) if self.kind == "fraction" else int(self.value)

    def costs(self, n_tokens: np.ndarray) -> np.ndarray:
        """What each example costs against :meth:`limit`: 1, or its tokens. (N,) -> (N,) int64."""
        n_tokens = np.asarray(n_tokens, dtype=np.int64)
        return n_tokens if self.kind == "tokens" else np.ones(len(n_tokens), np.int64)


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


def fits(cost_in_order: np.ndarray, limit: int) -> np.ndarray:
    """Which candidates a walk in order takes: each one whose cost still fits in what is left.
    (M,) costs in order -> (M,) bool. Exact for any costs; O(M) plus a walk over the few small
    candidates after the first overflow."""
    cost = np.asarray(cost_in_order, dtype=np.int64)
    take = np.zeros(len(cost), bool)
    if len(cost) == 0 or limit <= 0:
        return take
    csum = np.cumsum(cost)
    p = int(np.searchsorted(csum, limit, side="right"))  # the first p fit as a prefix
    take[:p] = True
    left = limit - (int(csum[p - 1]) if p else 0)
    if p < len(cost) and left > 0:
        tail = p + 1 + np.flatnonzero(cost[p + 1:] <= left)  # cost[p] itself overflowed
        for j, c in zip(tail.tolist(), cost[tail].tolist(), strict=True):
            if c <= left:
                take[j] = True
                left -= c
                if left == 0:
                    break
    return take


def group_limits(limit: int, groups: list[str], shares: dict[str, float]) -> dict[str, int]:
    """Split a budget's limit over named groups by their shares. A ``"*"`` share is split evenly
    over the groups not named; groups that get no share get 0. Shares are normalised when they add
    up to more than 1; integer parts are handed out by largest remainder so they sum exactly."""
    named = {g: float(shares[g]) for g in groups if g in shares}
    others = [g for g in groups if g not in shares]
    rest = float(shares.get("*", 0.0))
    weights = {**named, **{g: rest / len(others) for g in others}} if others else dict(named)
    total = sum(weights.values())
    if total <= 0:
        return {g: 0 for g in groups}
    scale = 1.0 / total if total > 1 else 1.0
    names = sorted(weights)
    raw = np.array([weights[g] * scale for g in names])
    allowed = int(round(limit * raw.sum()))
    split = split_evenly(allowed, raw)
    return {**{g: 0 for g in groups}, **dict(zip(names, split.tolist(), strict=True))}


def take_with_quotas(order: np.ndarray, cost: np.ndarray, limit: int, group: np.ndarray | None = None,
                     limits: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Walk ``order`` under a total ``limit`` and, optionally, a limit per group.

    A group's limit is spent first by its own best candidates (the same skip rule), then the total
    over the survivors in the given order. -> (taken in order, over-quota mask over ``order``).
    """
    cost = np.asarray(cost, dtype=np.int64)
    over_quota = np.zeros(len(order), bool)
    if group is not None and limits is not None:
        g = np.asarray(group)[order]
        for name, lim in limits.items():
            pos = np.flatnonzero(g == name)  # few groups (sources): one vectorised pass each
            over_quota[pos[~fits(cost[order[pos]], int(lim))]] = True
    survivors = order[~over_quota]
    return survivors[fits(cost[survivors], limit)], over_quota
