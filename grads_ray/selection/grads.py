"""GrADS (arXiv 2511.08620, "Learn More, Forget Less") as named components; docs/grads.md has the
formulas, what the paper states and where our choice fills a gap. Arrays in, arrays out.

1. :func:`gradient_signal` — the configured layer groups' statistics, each transformed (log of a
   magnitude, asinh of a signed mean), normalised over the corpus and averaged into one signal.
2. :func:`criteria` — self-adaptive thresholds: each normalised statistic (and the signal) must lie
   within k of the centre in the configured direction; k is given or Chauvenet's rule for N.
3. :func:`region_score` — a Gaussian KDE of the signal over the corpus and the region examples are
   taken from: dense (representative, default), sparse, hdr (the highest-density region holding a
   given mass) or match (signal strata, taken in proportion: the subset keeps the distribution).
4. Content diversity — the k-NN diversity of the similarity stage (as a rank), and cluster-balanced
   quotas over its k-means clusters (applied to the order by :mod:`grads_ray.selection.choose`).
5. :func:`redundancy` — similarity reduction: each example's highest cosine to a k-NN neighbour
   ranked above it; near-duplicate groups are capped by the selection itself.
6. :func:`grads_components` — score = w_region·region + w_diversity·diversity + w_loss·rank(loss)
   − w_redundancy·redundancy; every component is returned for selection.parquet.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import numpy as np

from grads_ray.selection.kde import bandwidth, hdr_level, kde_density
from grads_ray.selection.ranking import NORMALIZERS, chauvenet_k, order_desc, quantile_bins, rank01

EPS = 1e-30
SIGNED_STATS = ("grad_mean",)  # signed statistics: asinh-transformed; the rest are magnitudes


def transform(values: np.ndarray, stat: str) -> np.ndarray:
    """Magnitudes (norm, std, max, |min|) are log-normal-like: log(|x| + 1e-30). The signed mean is
    kept signed and its heavy tails tamed: asinh(x / median|x|). (N,) -> (N,) float64."""
    x = np.asarray(values, dtype=np.float64)
    if stat.rsplit(".", 1)[-1] in SIGNED_STATS:
        scale = np.median(np.abs(x[np.isfinite(x)])) if np.isfinite(x).any() else 1.0
        return np.arcsinh(x / (scale if scale > 0 else 1.0))
    return np.log(np.abs(x) + EPS)


def signal_columns(columns: dict[str, np.ndarray], stats: list[str], groups: list[str]) -> list[str]:
    """The stats-table columns the signal reads: ``<group>.<stat>`` for each configured group and
    statistic present; when no group column exists, the overall ``<stat>`` columns."""
    used = [f"{g}.{s}" for g in groups for s in stats if f"{g}.{s}" in columns]
    if not used:
        used = [s for s in stats if s in columns]
    if not used:
        raise ValueError(f"none of the statistics {stats} (groups {groups}) is in the stats table")
    return used


def gradient_signal(columns: dict[str, np.ndarray], stats: list[str], groups: list[str],
                    normalize: str = "zscore", weights: dict[str, float] | None = None,
                    each=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Combine the statistics into one signal: s_i = Σ_c w_c·norm(transform(c))_i / Σ_c w_c.
    ``weights`` is keyed by statistic (``grad_norm``) or by column (``head.grad_norm``), default 1.
    -> ((N,) signal, {column: (N,) normalised values}). With ``each``, ``each(column, values)`` is
    called for each column instead and the dict is empty: one column is held at a time."""
    norm = NORMALIZERS[normalize]
    used = signal_columns(columns, stats, groups)
    weights = weights or {}
    w = np.array([float(weights.get(c, weights.get(c.rsplit(".", 1)[-1], 1.0))) for c in used])
    if w.sum() <= 0:
        raise ValueError("the signal's weights add up to 0")
    signal, z = None, {}
    for c, wc in zip(used, w / w.sum(), strict=True):  # one column at a time: columns may be read on demand
        zc = norm(transform(columns[c], c))
        signal = wc * zc if signal is None else signal + wc * zc
        if each is None:
            z[c] = zc
        else:
            each(c, zc)
    return signal, z


def within(z: np.ndarray, k: float, direction: str) -> np.ndarray:
    """The band test: both -> |z| ≤ k, upper -> z ≤ k (cut the high tail), lower -> z ≥ -k (cut the
    low tail), none -> always. (N,) -> (N,) bool."""
    if direction == "both":
        return np.abs(z) <= k
    if direction == "upper":
        return z <= k
    if direction == "lower":
        return z >= -k
    if direction == "none":
        return np.ones(len(z), bool)
    raise ValueError(f"unknown criterion direction {direction!r}: both, upper, lower or none")


def criteria(z: dict[str, np.ndarray], signal_z: np.ndarray, k: float | str, direction: str,
             directions: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Self-adaptive gradient-distribution criteria. Each normalised column and the normalised
    signal must pass :func:`within`; a column's direction is looked up by column, then statistic,
    then ``signal`` for the signal, else ``direction``. k = ``"auto"``: Chauvenet's k for N.
    -> ((N,) passes every criterion, (N,) number of criteria failed, k used)."""
    n = len(signal_z)
    k_used = chauvenet_k(n) if k == "auto" else float(k)
    failed = np.zeros(n, np.int64)
    for c, values in {**z, "signal": signal_z}.items():
        failed += ~within(values, k_used, direction_of(c, direction, directions))
    return failed == 0, failed, k_used


def direction_of(column: str, direction: str, directions: dict[str, str] | None) -> str:
    """A criterion's direction: by column, then by statistic, else ``direction``."""
    directions = directions or {}
    return directions.get(column, directions.get(column.rsplit(".", 1)[-1], direction))


def region_score(signal: np.ndarray, fit: np.ndarray, region: str, bandwidth_rule: str | float,
                 mass: float = 0.9, strata: int = 20) -> dict[str, np.ndarray]:
    """Where examples are taken from, by a Gaussian KDE of the signal fitted on the examples in
    ``fit`` (those passing the criteria) and evaluated at every example.

    dense: region = p(s)/max p (representative first); sparse: 1 - p(s)/max p (rare first);
    hdr: 1 inside the highest-density region holding ``mass`` of the fitted examples, else 0;
    match: 0 everywhere, and ``stratum`` (equal-count signal bins) so the order can take each
    stratum in proportion. -> {density (N,), region (N,), stratum (N,) int64 or absent}.
    """
    base = signal[fit] if fit.any() else signal
    h = bandwidth(base, bandwidth_rule)
    dens = kde_density(base, h, at=signal)
    top = dens.max() if len(dens) and dens.max() > 0 else 1.0
    out = {"density": dens / top}
    if region == "dense":
        out["region"] = out["density"]
    elif region == "sparse":
        out["region"] = 1.0 - out["density"]
    elif region == "hdr":
        level = hdr_level(out["density"][fit] if fit.any() else out["density"], mass)
        out["region"] = (out["density"] >= level).astype(np.float64)
    elif region == "match":
        out["region"] = np.zeros(len(signal))
        out["stratum"] = quantile_bins(signal, strata)
    else:
        raise ValueError(f"unknown region {region!r}: dense, sparse, hdr or match")
    return out


def redundancy(base: np.ndarray, tiebreak: np.ndarray, nn_idx, nn_sims: np.ndarray | None = None) -> np.ndarray:
    """Similarity reduction: the highest cosine between an example and any of its k nearest
    neighbours that ranks above it by ``base`` score (ties by ``tiebreak``), clipped at 0.
    An example whose better neighbours are near copies of it is pushed down; the best of a
    neighbourhood is not. (N,), (N,), (N, k) int (-1 = none), (N, k) -> (N,) float64 in [0, 1].
    ``nn_idx`` may instead be a :class:`grads_ray.selection.inputs.Neighbours` (``nn_sims`` None):
    the lists are then read block by block, never whole."""
    from grads_ray.selection.inputs import Neighbours

    n = len(base)
    if nn_idx is None or (not isinstance(nn_idx, Neighbours) and nn_idx.size == 0):
        return np.zeros(n)
    blocks = nn_idx if isinstance(nn_idx, Neighbours) else Neighbours.from_arrays(nn_idx, nn_sims)
    rank = np.empty(n, np.int64)
    rank[order_desc(base, tiebreak)] = np.arange(n)
    out = np.zeros(n)
    for pos, idx, sims in blocks:
        if idx.size == 0:
            continue
        valid = idx >= 0
        j = np.where(valid, idx, 0)
        above = valid & (rank[j] < rank[pos][:, None])
        best = np.where(above, np.nan_to_num(sims, neginf=0.0), 0.0).max(axis=1, initial=0.0)
        out[pos] = np.clip(best, 0.0, 1.0)
    return out


def grads_components(columns: dict[str, np.ndarray], cfg: Any, *, tiebreak: np.ndarray,
                     diversity: np.ndarray | None = None, nn_idx: np.ndarray | None = None,
                     nn_sims: np.ndarray | None = None, out: MutableMapping | None = None) -> MutableMapping:
    """Every GrADS component for N examples (``cfg``: a :class:`grads_ray.config.GradsConfig`).

    -> {signal.<column> (normalised inputs), signal, signal_z, criteria_failed, in_band, density,
    region, [stratum], diversity, loss_rank, redundancy, score} as (N,) arrays, put into ``out`` (a
    new dict if None) each as soon as it is final, so a mapping that spills to disk
    (:class:`grads_ray.selection.spill.ColumnSpill`) holds at most a few at once. The normalised
    inputs are float32 (reported only; the criteria test them in float64, column by column, as
    :func:`criteria` does). ``nn_idx`` may be a :class:`grads_ray.selection.inputs.Neighbours`
    (see :func:`redundancy`).
    """
    out = {} if out is None else out
    n = len(columns["loss"])
    k = chauvenet_k(n) if cfg.k == "auto" else float(cfg.k)
    failed = np.zeros(n, np.int64)

    def each(c: str, values: np.ndarray) -> None:  # criteria() column by column
        nonlocal failed
        failed += ~within(values, k, direction_of(c, cfg.direction, cfg.directions))
        out[f"signal.{c}"] = values.astype(np.float32)

    signal, _ = gradient_signal(columns, cfg.stats, cfg.groups, cfg.normalize, cfg.stat_weights, each=each)
    signal_z = NORMALIZERS[cfg.normalize](signal)
    failed += ~within(signal_z, k, direction_of("signal", cfg.direction, cfg.directions))
    in_band = (failed == 0) & np.isfinite(signal)
    out.update(signal_z=signal_z, criteria_failed=failed)
    del signal_z, failed
    reg = region_score(np.nan_to_num(signal), in_band, cfg.region, cfg.bandwidth, cfg.region_mass, cfg.strata)
    out.update(signal=signal, in_band=in_band)
    del signal
    base = cfg.w_region * reg["region"]
    out.update(reg)
    del reg
    div = rank01(diversity) if diversity is not None else np.zeros(n)
    base += cfg.w_diversity * div
    out["diversity"] = div
    del div
    loss_rank = rank01(columns["loss"])
    base += cfg.w_loss * loss_rank
    out["loss_rank"] = loss_rank
    del loss_rank
    red = redundancy(base, tiebreak, nn_idx, nn_sims) if cfg.w_redundancy else np.zeros(n)
    out["redundancy"] = red
    out["score"] = base - cfg.w_redundancy * red
    return out
