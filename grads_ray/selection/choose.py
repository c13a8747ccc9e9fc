"""Selection under a budget, for every method; deterministic for a seed. Arrays in, arrays out.

Rows may come in any order: ties break by a seeded hash of the id, so the subset depends on the
ids, the numbers and the seed only, never on shards, actors or row order.

Every scored example gets a verdict: selected (with its rank) or the reason it was not, the first
that applies of ``duplicate`` (its near-duplicate group already has ``max_per_dup_group`` members
ranked above it), ``too_similar`` (the optional greedy similarity pass, ``max_similarity``),
``over_source_quota`` (its source's share of the budget was spent), ``outside_band`` (GrADS's
criteria) / ``ifd_above_max`` (IFD), or ``over_budget``. A row whose loss or gradient statistics
are not finite (NaN, inf) is ``nonfinite``: it is left out before any distribution is fitted.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import numpy as np
import pyarrow as pa

from grads_ray.columns import finite_mask, id_hash
from grads_ray.selection.budget import Budget, group_limits, take_with_quotas
from grads_ray.selection.inputs import SelectionInputs, method_needs
from grads_ray.selection.methods import Picking, method
from grads_ray.selection.ranking import cap_per_group, interleave, order_desc


def source_codes(source: pa.Array | pa.ChunkedArray | np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Names per row -> ((N,) int64 codes, the names by code), through Arrow's dictionary encoding."""
    arr = source if isinstance(source, (pa.Array, pa.ChunkedArray)) else pa.array(source, pa.string())
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    enc = arr.dictionary_encode()  # a dictionary array stays as it is: it may name sources no row has
    present, code = np.unique(enc.indices.to_numpy(zero_copy_only=False), return_inverse=True)
    names = enc.dictionary.to_pylist()
    return code.astype(np.int64).reshape(-1), [names[i] for i in present]


def count_by(names: pa.Array | pa.ChunkedArray | np.ndarray, mask: np.ndarray) -> dict[str, int]:
    """How many rows under ``mask`` ((N,) bool) carry each name ((N,) names)."""
    code, labels = source_codes(names)
    counts = np.bincount(code[mask], minlength=len(labels))
    return {label: int(c) for label, c in zip(labels, counts, strict=True) if c}


def select(inputs: SelectionInputs, budget: Budget, cfg: Any, seed: int, device: str = "cpu",
           result: MutableMapping | None = None) -> MutableMapping:
    """:func:`select_finite` over the rows with finite statistics (:func:`finite_mask`); the others
    get ``reason`` ``nonfinite``, ``rank`` -1 and empty components. Same arguments and result;
    ``result`` (a new dict if None) receives the result columns, one at a time (it may spill them:
    :class:`grads_ray.selection.spill.ColumnSpill`)."""
    result = {} if result is None else result
    ok = finite_mask(inputs.columns)
    if ok.all():
        return select_finite(inputs, budget, cfg, seed, device, result)
    keep = np.flatnonzero(ok)
    select_finite(inputs.rows(keep), budget, cfg, seed, device, result)
    for name in list(result):  # each column back to every row, in turn
        values = np.asarray(result[name])
        fill = {"b": False, "i": -1, "u": 0, "f": np.nan}.get(values.dtype.kind, "")
        full = np.full(len(ok), fill, dtype=values.dtype if values.dtype.kind != "U" else object)
        full[keep] = values
        if name == "reason":
            full[~ok] = "nonfinite"
        result[name] = full
    return result


def select_finite(inputs: SelectionInputs, budget: Budget, cfg: Any, seed: int,
                  device: str = "cpu", result: MutableMapping | None = None) -> MutableMapping:
    """Choose a subset of N scored examples (``cfg``: a :class:`grads_ray.config.SelectConfig`) from
    ``inputs`` (what :func:`grads_ray.selection.inputs.method_needs` names must be there).

    The method (:data:`grads_ray.selection.methods.METHODS`) ranks the rows, or picks them itself;
    near-duplicate caps, the similarity pass, quotas and the budget follow, the same for every method.
    ``device``: where FisherSFT's greedy and the similarity pass run (``cpu`` or ``cuda``).
    -> ``result`` (a new dict if None) with (N,) arrays: ``selected``, ``rank`` (-1 if not), ``reason``,
    ``score`` and every component.
    """
    m = method(cfg.method)
    inputs.require(method_needs(cfg), cfg.method)
    n = len(inputs)
    tiebreak = id_hash(inputs.ids, seed)
    cost = budget.costs(inputs.columns["n_tokens"])
    limit = budget.limit(n)
    limits = code = None
    if cfg.quotas and inputs.source is not None:
        code, names = source_codes(inputs.source)
        unknown = sorted(set(cfg.quotas) - set(names) - {"*"})
        if unknown:
            raise ValueError(f"select.quotas names {unknown[0]!r}, which is no source of the corpus "
                             f"(sources: {', '.join(sorted(names)[:10])})")
        by_name = group_limits(limit, sorted(names), cfg.quotas)
        limits = {c: by_name[name] for c, name in enumerate(names)}
    reason = np.full(n, "", dtype=object)
    result = {} if result is None else result
    dedup = cfg.dedup == "true" or (cfg.dedup == "auto" and m.dedup_by_default)
    groups = (inputs.similarity or {}).get("dup_group") if dedup else None
    p = Picking(inputs=inputs, cfg=cfg, seed=seed, device=device, tiebreak=tiebreak, cost=cost, limit=limit,
                code=code, limits=limits, groups=groups, reason=reason, result=result)
    if m.choose is not None:  # the method spends the budget itself
        return _verdicts(result, m.choose(p), reason)

    ranked = m.rank(p)
    if "score" not in result:  # GrADS put its own
        result["score"] = ranked.score
    preferred = np.ones(n, bool) if ranked.preferred is None else np.asarray(ranked.preferred, bool)
    order = order_desc(ranked.score, tiebreak)
    first, rest = order[preferred[order]], order[~preferred[order]]
    if ranked.balance is not None:
        first = interleave(first, *ranked.balance)
    order = first if ranked.preferred_only and not cfg.fill else np.concatenate([first, rest])
    if groups is not None:
        order, dropped = cap_per_group(order, groups, cfg.max_per_dup_group)
        reason[dropped] = "duplicate"
    if cfg.max_similarity > 0:
        order = _far_apart(order, inputs.vectors, cfg.max_similarity, cost, limit, code, limits, reason, device)
    chosen, over_quota = take_with_quotas(order, cost, limit, code, limits)
    reason[order[over_quota]] = "over_source_quota"
    if m.not_preferred:
        reason[(reason == "") & ~preferred] = m.not_preferred
    return _verdicts(result, chosen, reason)


def _far_apart(order, vectors, threshold, cost, limit, code, limits, reason, device) -> np.ndarray:
    """The greedy similarity pass: candidates closer than ``threshold`` (cosine) to one ranked above
    them that passed get ``too_similar``; the walk stops once the budget is spent, and what it did
    not reach keeps its place behind (nothing more fits there). -> the order without the rejected."""
    from grads_ray.similarity.index import greedy_far_apart

    def spent(accepted: np.ndarray) -> bool:
        if cost[accepted].sum() < limit:
            return False
        taken, _ = take_with_quotas(accepted, cost, limit, code, limits)
        return limit - cost[taken].sum() < cost.min(initial=1)

    accepted, rejected, examined = greedy_far_apart(order, vectors, threshold, spent,
                                                    use_gpu=device.startswith("cuda") or None)
    reason[rejected] = "too_similar"
    return np.concatenate([accepted, order[examined:]])


def _verdicts(out: dict[str, np.ndarray], chosen: np.ndarray, reason: np.ndarray) -> dict[str, np.ndarray]:
    """Add ``selected``, ``rank`` (pick order, -1 if not) and ``reason`` to ``out``: the chosen get
    "", the rest keep the reason already set, else ``over_budget``."""
    rank = np.full(len(reason), -1, dtype=np.int64)
    rank[chosen] = np.arange(len(chosen))
    selected = rank >= 0
    reason[selected] = ""
    reason[~selected & (reason == "")] = "over_budget"
    out.update({"selected": selected, "rank": rank, "reason": reason})
    return out
