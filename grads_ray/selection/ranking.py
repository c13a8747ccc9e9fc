"""Vectorised building blocks of every selection: normalisation, seeded tie-breaks, orders, quotas.

Arrays in, arrays out; nothing here loops over rows in Python, so 10^7 rows take seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
ID_HASH_BLOCK = 1 << 16  # id_hash: rows hashed at a time


def _splitmix(h: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: every input bit moves every output bit. uint64 -> uint64."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def id_hash(ids: pa.Array | pa.ChunkedArray | list[str], seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each id (FNV-1a over its UTF-8 bytes, then splitmix64), read straight
    from Arrow's buffers. It depends on the id and the seed only, never on row order, shards or the
    other ids, so ties break the same way however the corpus was split. (N,) -> (N,) uint64."""
    arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    _, off_buf, data_buf = arr.buffers()  # the offsets as they are (32 or 64 bits): no copy of the ids
    width = 8 if pa.types.is_large_string(arr.type) else 4
    offsets = np.frombuffer(off_buf, np.int64 if width == 8 else np.int32, n + 1, arr.offset * width)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    start0 = _FNV_OFFSET ^ _splitmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    out = np.empty(n, np.uint64)
    for a in range(0, n, ID_HASH_BLOCK):  # each id's hash is its own: blocks bound the temporaries
        b = min(a + ID_HASH_BLOCK, n)
        off = offsets[a:b + 1].astype(np.int64)
        start, length = off[:-1], np.diff(off)
        h = np.full(b - a, start0, np.uint64)
        longest_first = np.argsort(-length, kind="stable")
        desc = length[longest_first]
        with np.errstate(over="ignore"):
            for j in range(int(length.max(initial=0))):  # byte j of every id longer than j: Σ lengths in all
                live = longest_first[:int(np.searchsorted(-desc, -j, side="left"))]
                h[live] = (h[live] ^ data[start[live] + j].astype(np.uint64)) * _FNV_PRIME
        out[a:b] = _splitmix(h)
    return out


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
