"""Vectorised building blocks of every selection: normalisation, seeded tie-breaks, orders, quotas.

Arrays in, arrays out; nothing here loops over rows in Python, so 10^7 rows take seconds.
"""

from __future__ import annotations

import math

import numpy as np


def order_desc(score: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Indices by descending score, equal scores by ascending ``tiebreak`` (the id hash); NaN last.
    (N,), (N,) -> (N,) int64."""
    s = np.asarray(score, dtype=np.float64)
    key = np.where(np.isnan(s), np.inf, -s)
    return np.lexsort((tiebreak, key)).astype(np.int64)


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the corpus (population std); a constant column gives zeros. (N,) -> (N,)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 · MAD): a z-score that a few wild values cannot stretch (equals the
    z-score for a normal sample); falls back to the z-score when the MAD is 0. (N,) -> (N,)."""
    x = np.asarray(x, dtype=np.float64)
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    return (x - med) / mad if mad > 0 else zscore(x)


def rank01(x: np.ndarray) -> np.ndarray:
    """Mid-ranks scaled to [0, 1] (equal values share a rank); N = 1 gives 1. (N,) -> (N,)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n <= 1:
        return np.ones(n)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    run = np.cumsum(first) - 1  # run id of each sorted position
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], n] - 1
    ranks = np.empty(n)
    ranks[order] = (starts[run] + ends[run]) / 2
    return ranks / (n - 1)


def normal_scores(x: np.ndarray) -> np.ndarray:
    """Ranks mapped through the normal quantile function (Blom): Φ⁻¹((r - 3/8) / (N + 1/4)), r the
    1-based mid-rank. Any distribution in, standard-normal-shaped out. (N,) -> (N,)."""
    from scipy.special import ndtri

    n = len(x)
    if n <= 1:
        return np.zeros(n)
    r = rank01(x) * (n - 1) + 1
    return ndtri((r - 0.375) / (n + 0.25))


NORMALIZERS = {"zscore": zscore, "robust": robust_z, "rank": normal_scores}


def chauvenet_k(n: int) -> float:
    """Chauvenet's criterion: the |z| beyond which fewer than half an example of a normal sample of
    size n is expected, Φ⁻¹(1 - 1/(4n)). Grows slowly with n (3.48 at 10^3, 5.45 at 10^7)."""
    from scipy.special import ndtri

    return float(ndtri(1 - 1 / (4 * max(n, 2))))


def within_group_rank(order: np.ndarray, group: np.ndarray) -> np.ndarray:
    """For each position j of ``order``, how many earlier positions hold the same group.
    (M,) indices, (N,) group per index -> (M,) int64."""
    m = len(order)
    if m == 0:
        return np.zeros(0, np.int64)
    g = np.asarray(group)[order]
    by_group = np.lexsort((np.arange(m), g))  # positions grouped, in order inside a group
    gs = g[by_group]
    first = np.r_[True, gs[1:] != gs[:-1]]
    start_of_run = np.maximum.accumulate(np.where(first, np.arange(m), 0))
    out = np.empty(m, np.int64)
    out[by_group] = np.arange(m) - start_of_run
    return out


def cap_per_group(order: np.ndarray, group: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk ``order`` and keep at most ``cap`` members of each group. -> (kept, dropped), in order."""
    keep = within_group_rank(order, group) < cap
    return order[keep], order[~keep]


def interleave(order: np.ndarray, group: np.ndarray, alpha: float) -> np.ndarray:
    """Re-order so that every prefix takes from each group in proportion to size^alpha.

    Inside a group the given order is kept. The member of within-group rank r of group c gets the
    key (r + 1/2) / w_c, w_c = |c|^alpha (sizes counted over ``order``); sorting by key (then by the
    old position) merges the groups. alpha = 0: round-robin, equal shares (balanced coverage);
    alpha = 1: shares proportional to group sizes (a stratified sample); between: a compromise.
    Groups that run out simply stop contributing. (M,) indices, (N,) group -> (M,) indices.
    """
    m = len(order)
    if m == 0:
        return order
    g = np.asarray(group)[order]
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    w = counts.astype(np.float64) ** alpha
    key = (within_group_rank(order, group) + 0.5) / w[inverse]
    return order[np.lexsort((np.arange(m), key))]


def quantile_bins(x: np.ndarray, bins: int) -> np.ndarray:
    """Equal-count bins of x by rank (ties spread by position). (N,) -> (N,) int64 in [0, bins)."""
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64)
    pos = np.empty(n, np.int64)
    pos[np.argsort(np.asarray(x, dtype=np.float64), kind="stable")] = np.arange(n)
    return np.minimum((pos * bins) // n, bins - 1)


def split_evenly(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` that sum exactly to ``total`` (largest remainder).
    (G,) -> (G,) int64."""
    w = np.asarray(weights, dtype=np.float64)
    if total <= 0 or w.sum() <= 0:
        return np.zeros(len(w), np.int64)
    raw = total * w / w.sum()
    base = np.floor(raw).astype(np.int64)
    rest = total - int(base.sum())
    base[np.argsort(-(raw - base), kind="stable")[:rest]] += 1
    return base


def ceil_fraction(value: float, n: int) -> int:
    """ceil(value · n) without float noise turning 0.1·30 = 3.0000000000000004 into 4."""
    return int(math.ceil(round(value * n, 9)))
