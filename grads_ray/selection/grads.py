"""A first GrADS score (arXiv 2511.08620), as documented in docs/grads.md. Arrays in, arrays out.

1. Gradient signal: for each configured (group, statistic), x = log(|stat| + eps), z-scored over the
   corpus; the signal s_i is the mean of those z-scores.
2. Band criterion (self-adaptive): z(s_i) beyond ±tail_k is excluded as noisy/uninformative.
3. Representativeness: a Gaussian KDE of s over the corpus (Scott or Silverman bandwidth, or given),
   evaluated at each s_i and scaled to [0, 1] by its maximum.
4. Diversity: 1 - mean cosine similarity to the k nearest neighbours, as a rank in [0, 1].
5. score = w_density·density + w_diversity·diversity + w_loss·rank(loss).
Similarity reduction and the budget are applied by :func:`grads_ray.selection.select.select`.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the corpus; a constant column gives zeros. (N,) -> (N,) float64."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def rank01(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties broken by position); N=1 gives 1. (N,) -> (N,) float64."""
    n = len(x)
    if n <= 1:
        return np.ones(n)
    ranks = np.empty(n)
    ranks[np.argsort(x, kind="stable")] = np.arange(n)
    return ranks / (n - 1)


def bandwidth(x: np.ndarray, rule: str | float) -> float:
    """Gaussian KDE bandwidth: Scott σ·n^(-1/5), Silverman 0.9·min(σ, IQR/1.34)·n^(-1/5), or a number."""
    try:
        return float(rule)
    except (TypeError, ValueError):
        pass
    n = max(len(x), 1)
    sd = float(np.std(x))
    if rule == "scott":
        h = sd * n ** (-0.2)
    elif rule == "silverman":
        iqr = float(np.subtract(*np.percentile(x, [75, 25])))
        spread = min(sd, iqr / 1.34) if iqr > 0 else sd
        h = 0.9 * spread * n ** (-0.2)
    else:
        raise ValueError(f"unknown bandwidth rule {rule!r}: scott, silverman or a number")
    return h if h > 0 else 1.0


def kde_density(x: np.ndarray, h: float, grid: int = 2048) -> np.ndarray:
    """Gaussian KDE of the sample x evaluated at each x_i, by linear binning on a grid and a discrete
    convolution: O(N + grid·m) instead of O(N²). (N,) -> (N,) float64 densities."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min() - 4 * h, x.max() + 4 * h
    step = (hi - lo) / (grid - 1)
    pos = (x - lo) / step  # fractional grid position
    left = np.clip(np.floor(pos).astype(np.int64), 0, grid - 2)
    frac = pos - left
    counts = np.bincount(left, 1 - frac, minlength=grid) + np.bincount(left + 1, frac, minlength=grid)
    m = int(min(grid - 1, np.ceil(4 * h / step)))
    offsets = np.arange(-m, m + 1) * step
    kernel = np.exp(-0.5 * (offsets / h) ** 2) / (h * np.sqrt(2 * np.pi) * len(x))
    dens_grid = np.convolve(counts, kernel, mode="same")
    return np.interp(x, lo + step * np.arange(grid), dens_grid)


def gradient_signal(columns: dict[str, np.ndarray], stats: list[str], groups: list[str]) -> tuple[np.ndarray, list[str]]:
    """Combine the configured statistics into one signal. -> ((N,) signal, names of the columns used).

    Reads ``<group>.<stat>`` for each configured group present, else the overall ``<stat>``.
    """
    used = [f"{g}.{s}" for g in groups for s in stats if f"{g}.{s}" in columns]
    if not used:
        used = [s for s in stats if s in columns]
    if not used:
        raise ValueError(f"none of the statistics {stats} is in the stats table")
    z = [zscore(np.log(np.abs(np.asarray(columns[c], dtype=np.float64)) + EPS)) for c in used]
    return np.mean(z, axis=0), used


def grads_scores(columns: dict[str, np.ndarray], diversity: np.ndarray, *, stats: list[str],
                 groups: list[str], tail_k: float, bandwidth_rule: str | float,
                 w_density: float, w_diversity: float, w_loss: float) -> dict[str, np.ndarray]:
    """Score components for N examples: signal, signal_z, in_band, density, diversity, score."""
    signal, _ = gradient_signal(columns, stats, groups)
    sz = zscore(signal)
    in_band = np.abs(sz) <= tail_k
    h = bandwidth(signal[in_band] if in_band.any() else signal, bandwidth_rule)
    dens = kde_density(signal, h)
    dens = dens / dens.max() if dens.max() > 0 else dens
    div = rank01(diversity)
    loss_rank = rank01(np.asarray(columns["loss"], dtype=np.float64))
    score = w_density * dens + w_diversity * div + w_loss * loss_rank
    return {"signal": signal, "signal_z": sz, "in_band": in_band, "density": dens,
            "diversity": div, "score": score}
