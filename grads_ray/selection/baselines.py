"""The baselines users compare GrADS and FisherSFT against; each maps columns to one score (higher is
taken first). Arrays in, arrays out.

- random: a uniform number from the seeded id hash (the same subset however the corpus is sharded);
- loss: the example's mean response-token loss after the warm-up, highest (or lowest) first;
- grad_norm: the norm of its gradient (overall or a layer group's), highest (or lowest) first;
- IFD (Li et al. 2023, "From Quantity to Quality"): loss(response | prompt) / loss(response alone);
  high means the prompt helps little, so the example is hard to follow; ≥ 1 (the prompt does not help
  at all) is taken last, as the paper filters those out;
- LESS-style (Xia et al. 2024): cosine of each example's projected gradient to the mean projected
  gradient of a target set (or the best cosine to any target example).
"""

from __future__ import annotations

import numpy as np


def random_score(tiebreak: np.ndarray) -> np.ndarray:
    """U[0, 1) from the top 53 bits of the seeded id hash. (N,) uint64 -> (N,) float64."""
    return (np.asarray(tiebreak, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def ordered(values: np.ndarray, order: str) -> np.ndarray:
    """A column as a score: itself for ``highest``, negated for ``lowest``. (N,) -> (N,) float64."""
    x = np.asarray(values, dtype=np.float64)
    return x if order == "highest" else -x


def ifd(loss: np.ndarray, loss_response_only: np.ndarray) -> np.ndarray:
    """Instruction-following difficulty: conditioned over unconditioned response loss; NaN where the
    unconditioned loss is missing or 0. (N,), (N,) -> (N,) float64."""
    num = np.asarray(loss, dtype=np.float64)
    den = np.asarray(loss_response_only, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def less_score(grad_proj: np.ndarray, target_proj: np.ndarray, reduce: str = "mean",
               chunk: int = 1 << 16) -> np.ndarray:
    """LESS-style relevance. ``mean``: cos(g_i, mean_j ĝ_j) with ĝ_j the unit target gradients (LESS
    averages per-example cosines over a target task, which is this up to a constant factor);
    ``max``: max_j cos(g_i, g_j). (N, k), (T, k) -> (N,) float64."""
    targets = _unit_rows(target_proj)
    if len(targets) == 0:
        raise ValueError("the LESS target set has no scored example")
    out = np.empty(len(grad_proj))
    if reduce == "mean":
        centre = _unit_rows(targets.mean(0, keepdims=True))[0]
        for s in range(0, len(grad_proj), chunk):
            out[s:s + chunk] = _unit_rows(grad_proj[s:s + chunk]) @ centre
        return out
    for s in range(0, len(grad_proj), chunk):
        out[s:s + chunk] = (_unit_rows(grad_proj[s:s + chunk]) @ targets.T).max(1)
    return out
