"""Selection under a budget: GrADS or random, deterministic for a seed. Arrays in, arrays out.

Every scored example gets a verdict: selected (with its rank) or a reason it was not:
``outside_band`` (GrADS tail criterion), ``duplicate`` (its near-duplicate group already has
``max_per_dup_group`` members selected) or ``over_budget``.
"""

from __future__ import annotations

import numpy as np

from grads_ray.selection.budget import Budget, take_within_budget
from grads_ray.selection.grads import grads_scores


def _order(score: np.ndarray, seed: int) -> np.ndarray:
    """Indices by descending score; ties broken by a seeded permutation (deterministic)."""
    tiebreak = np.random.default_rng(seed).permutation(len(score))
    return np.lexsort((tiebreak, -score))


def cap_per_group(order: np.ndarray, group: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk ``order`` and keep at most ``cap`` members per group. -> (kept, dropped) in order."""
    seen: dict[int, int] = {}
    keep = np.zeros(len(order), dtype=bool)
    for j, i in enumerate(order.tolist()):
        g = int(group[i])
        if seen.get(g, 0) < cap:
            seen[g] = seen.get(g, 0) + 1
            keep[j] = True
    return order[keep], order[~keep]


def select(columns: dict[str, np.ndarray], budget: Budget, method: str, seed: int, *,
           diversity: np.ndarray | None = None, dup_group: np.ndarray | None = None,
           max_per_dup_group: int = 1, grads: dict | None = None) -> dict[str, np.ndarray]:
    """Rows must come in a deterministic order (the caller sorts by id).

    -> dict of (N,) arrays: ``selected`` (bool), ``rank`` (int, -1 if not selected), ``reason``
    (str, "" if selected), ``score`` and, for GrADS, each score component.
    """
    n = len(columns["loss"])
    n_tokens = np.asarray(columns["n_tokens"], dtype=np.int64)
    reason = np.full(n, "", dtype=object)
    out: dict[str, np.ndarray] = {}
    if method == "random":
        order = np.random.default_rng(seed).permutation(n)
        out["score"] = np.zeros(n)
    elif method == "grads":
        comps = grads_scores(columns, diversity if diversity is not None else np.zeros(n), **(grads or {}))
        out.update({k: v for k, v in comps.items()})
        order = _order(comps["score"], seed)
        band = comps["in_band"][order]
        reason[order[~band]] = "outside_band"
        order = order[band]
        if dup_group is not None:
            order, dropped = cap_per_group(order, dup_group, max_per_dup_group)
            reason[dropped] = "duplicate"
    else:
        raise ValueError(f"unknown selection method {method!r}")
    chosen = take_within_budget(order, n_tokens, budget, n)
    rank = np.full(n, -1, dtype=np.int64)
    rank[chosen] = np.arange(len(chosen))
    selected = rank >= 0
    reason[~selected & (reason == "")] = "over_budget"
    out.update({"selected": selected, "rank": rank, "reason": reason})
    return out
