"""The selection methods, one registry: each entry says what the method reads, how it scores and
orders the rows (or picks them itself, as FisherSFT does), why a row it does not prefer is left out,
what it asks of the config, and its one-line help. Config checks, ``--help``, the select stage, the
stage table (what ``select`` needs), ``compare`` and the tests all read :data:`METHODS`.

Adding a method (docs/design.md, "Adding a selection method"): write its maths as a pure function
(arrays in, arrays out) in a module of its own, add one :class:`Method` to :data:`METHODS` below, and
a test. A ranked method returns a :class:`Ranking`; the shared steps that follow (near-duplicate cap,
the ``max_similarity`` pass, source quotas, the budget, the verdicts) are the same for every method.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grads_ray.selection.inputs import MethodNeeds, SelectionInputs


@dataclass
class Picking:
    """What a method sees when it runs, for N finite rows in one order.

    ``inputs``: what :attr:`Method.needs` asked for; ``cfg``: the :class:`grads_ray.config.SelectConfig`;
    ``tiebreak`` (N,) uint64: the seeded id hash that breaks ties; ``cost`` (N,): each row's cost under
    the budget and ``limit`` the budget; ``code`` (N,) / ``limits``: source codes and their budget
    shares (None without quotas); ``groups`` (N,): near-duplicate groups when dedup is on, else None;
    ``reason`` (N,) object: verdicts so far, written into by a method that rejects rows itself;
    ``result``: the result columns (a method adds its components: ``score`` at least)."""

    inputs: SelectionInputs
    cfg: Any
    seed: int
    device: str
    tiebreak: np.ndarray
    cost: np.ndarray
    limit: float
    code: np.ndarray | None
    limits: dict[int, float] | None
    groups: np.ndarray | None
    reason: np.ndarray
    result: MutableMapping

    @property
    def n(self) -> int:
        return len(self.tiebreak)


@dataclass(frozen=True)
class Ranking:
    """A ranked method's answer. ``score`` (N,): higher is taken first; ``preferred`` (N,) bool: rows
    taken before all others (None: every row), the others marked with the method's
    :attr:`Method.not_preferred` reason when left out; ``preferred_only``: the others are not taken
    at all unless ``select.fill``; ``balance``: (labels (N,), alpha) to interleave the preferred rows
    across labels (clusters, strata), or None."""

    score: np.ndarray
    preferred: np.ndarray | None = None
    preferred_only: bool = False
    balance: tuple[np.ndarray, float] | None = None


@dataclass(frozen=True)
class Method:
    """One selection method.

    ``needs(select_cfg) -> MethodNeeds``: what it reads beyond ids and the base columns (the select
    stage reads just that; the stage table derives the stages ``select`` needs from it);
    ``rank(picking) -> Ranking`` for a ranked method, or ``choose(picking) -> (chosen positions in pick
    order)`` for one that spends the budget itself (then the shared steps are its own business);
    ``not_preferred``: the reason given to rows outside :attr:`Ranking.preferred`;
    ``check(config) -> message | None``: what it asks of the whole config (a message is a config
    error); ``dedup_by_default``: ``select.dedup=auto`` caps near-duplicates for it."""

    name: str
    about: str
    needs: Callable[[Any], MethodNeeds] = lambda sc: MethodNeeds()
    rank: Callable[[Picking], Ranking] | None = None
    choose: Callable[[Picking], np.ndarray] | None = None
    not_preferred: str = ""
    check: Callable[[Any], str | None] = field(default=lambda cfg: None)
    dedup_by_default: bool = False


# ------------------------------------------------------------------------------ the methods
def _grads_needs(sc) -> MethodNeeds:
    g = sc.grads
    return MethodNeeds(columns=(*g.stats, *(f"{grp}.{st}" for grp in g.groups for st in g.stats)), neighbours=True)


def _grads(p: Picking) -> Ranking:
    from grads_ray.selection.grads import grads_components

    g, sim = p.cfg.grads, p.inputs.similarity or {}
    out = p.result
    grads_components(p.inputs.columns, g, tiebreak=p.tiebreak, diversity=sim.get("diversity"),
                     nn_idx=sim.get("neighbours", sim.get("nn_idx")), nn_sims=sim.get("nn_sims"), out=out)
    out.update({k: sim[k] for k in ("cluster", "dup_group") if k in sim})
    cluster, balance = sim.get("cluster"), None
    if g.region == "match":
        strata = np.asarray(out["stratum"]).astype(np.int64)
        balance = (strata, 1.0) if cluster is None or g.cluster_alpha < 0 else (
            strata * (int(cluster.max(initial=0)) + 1) + cluster, max(g.cluster_alpha, 0.0))
    elif cluster is not None and g.cluster_alpha >= 0:
        balance = (cluster, g.cluster_alpha)
    return Ranking(out["score"], preferred=out["in_band"], preferred_only=True, balance=balance)


def _fisher_check(cfg) -> str | None:
    if not (cfg.score.fisher_dim and cfg.score.fisher_rank):
        return "select.method=fisher needs score.fisher_dim and score.fisher_rank > 0"
    if cfg.select.max_similarity > 0:
        return ("select.max_similarity does not apply to fisher (its log-det gain already discounts "
                "examples like those chosen)")
    return None


EXACT_FISHER_MAX = 50_000  # fisher.epsilon=auto: exact lazy greedy up to this many examples


def _fisher(p: Picking) -> np.ndarray:
    """FisherSFT's greedy spends the budget itself: near-duplicates beyond the cap are not eligible,
    source quotas bound its picks; ``fisher_gain_alone`` / ``fisher_gain`` are its components."""
    from grads_ray.selection.fisher import fisher_greedy, fisher_lambda
    from grads_ray.selection.ranking import cap_per_group, order_desc

    cfg, n, reason = p.cfg, p.n, p.reason
    eligible = np.ones(n, bool)
    if p.groups is not None:  # a duplicate's gain is low anyway; capping keeps the rule uniform
        _, dropped = cap_per_group(order_desc(np.zeros(n), p.tiebreak), p.groups, cfg.max_per_dup_group)
        eligible[dropped] = False
        reason[dropped] = "duplicate"
    factors = p.inputs.fisher_factors
    lam = fisher_lambda(factors, cfg.fisher.lam)
    eps = cfg.fisher.epsilon
    eps = (0.0 if n <= EXACT_FISHER_MAX else 0.01) if eps == "auto" else float(eps)
    chosen, gain, gain0 = fisher_greedy(
        factors, p.cost, p.limit, lam, order0=np.argsort(p.tiebreak, kind="stable"), eligible=eligible,
        group=p.code, group_limits=p.limits, epsilon=eps, batch=cfg.fisher.batch, seed=p.seed, device=p.device)
    picked_gain = np.full(n, np.nan)
    picked_gain[chosen] = gain
    p.result.update({"fisher_gain_alone": gain0, "fisher_gain": picked_gain,
                  "score": np.where(np.isnan(picked_gain), gain0, picked_gain)})
    if p.limits is not None:  # sources whose quota cannot pay for even the cheapest example
        used = np.bincount(p.code[chosen], weights=p.cost[chosen], minlength=len(p.limits))
        full = [g for g, lim in p.limits.items() if lim - used[g] < p.cost.min(initial=1)]
        reason[(reason == "") & np.isin(p.code, full)] = "over_source_quota"
    return chosen


def _random(p: Picking) -> Ranking:
    from grads_ray.selection.baselines import random_score

    return Ranking(random_score(p.tiebreak))


def _loss(p: Picking) -> Ranking:
    from grads_ray.selection.baselines import ordered

    return Ranking(ordered(p.inputs.columns["loss"], p.cfg.baseline.loss_order))


def _grad_norm(p: Picking) -> Ranking:
    from grads_ray.selection.baselines import ordered

    col = p.cfg.baseline.grad_norm_column
    if col not in p.inputs.columns:
        raise ValueError(f"select.baseline.grad_norm_column={col!r} is not in the stats table")
    return Ranking(ordered(p.inputs.columns[col], p.cfg.baseline.grad_norm_order))


def _ifd(p: Picking) -> Ranking:
    from grads_ray.selection.baselines import ifd

    columns = p.inputs.columns
    if "loss_response_only" not in columns or np.isnan(columns["loss_response_only"]).all():
        raise ValueError("IFD needs loss_response_only: rescore with score.response_only_loss=true")
    score = ifd(columns["loss"], columns["loss_response_only"])
    p.result["ifd"] = score
    ceiling = p.cfg.baseline.ifd_max
    return Ranking(score, preferred=np.nan_to_num(score, nan=np.inf) < ceiling if ceiling > 0 else None)


def _less(p: Picking) -> Ranking:
    from grads_ray.selection.baselines import less_score

    return Ranking(less_score(p.inputs.grad_proj, p.inputs.target_proj, p.cfg.less.reduce))


def _less_check(cfg) -> str | None:
    if not cfg.select.less.target_paths:
        return "select.method=less needs select.less.target_paths (the target/validation rows)"
    if not cfg.score.proj_dim:
        return "select.method=less needs projected gradients: score.proj_dim > 0"
    return None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("grads", "GrADS: self-adaptive bands on the gradient statistics, content diversity, "
           "near-duplicates capped", needs=_grads_needs, rank=_grads, not_preferred="outside_band",
           dedup_by_default=True),
    Method("fisher", "FisherSFT: greedy information gain (log-det) on last-layer features",
           needs=lambda sc: MethodNeeds(factors=True), choose=_fisher, check=_fisher_check),
    Method("random", "a seeded uniform sample (the same whatever the sharding)", rank=_random),
    Method("loss", "the warmed-up model's loss, highest (or lowest: select.baseline.loss_order) first",
           rank=_loss),
    Method("grad_norm", "a gradient norm column, highest (or lowest) first",
           needs=lambda sc: MethodNeeds(columns=(sc.baseline.grad_norm_column,)), rank=_grad_norm),
    Method("ifd", "instruction-following difficulty (Li et al. 2023), rows at or above "
           "select.baseline.ifd_max last", needs=lambda sc: MethodNeeds(columns=("loss_response_only",)),
           rank=_ifd, not_preferred="ifd_above_max",
           check=lambda cfg: None if cfg.score.response_only_loss else
           "select.method=ifd needs score.response_only_loss=true"),
    Method("less", "LESS-style: projected gradients' cosine to a target set's",
           needs=lambda sc: MethodNeeds(grad_proj=True, target=True), rank=_less, check=_less_check),
)}


def method(name: str) -> Method:
    """The registered method ``name``; a ValueError naming the registered ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown selection method {name!r} (methods: {', '.join(METHODS)})")
    return METHODS[name]


def help_text() -> str:
    """One line per method, for ``--help``."""
    return "\n".join(f"  {m.name:<10} {m.about}" for m in METHODS.values())
