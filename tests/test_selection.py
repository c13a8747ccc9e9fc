"""Selection: every component against a hand-computed example, FisherSFT against brute force,
budgets met exactly, and the same subset whatever the row order (shards, actors)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from grads_ray.columns import id_hash
from grads_ray.config import GradsConfig, SelectConfig
from grads_ray.selection.baselines import ifd, less_score, random_score
from grads_ray.selection.budget import (
    Budget,
    fits,
    group_limits,
    parse_budget,
    take_with_quotas,
)
from grads_ray.selection.choose import select
from grads_ray.selection.fisher import brute_force_greedy, fisher_greedy, log_det_objective
from grads_ray.selection.grads import criteria, gradient_signal, grads_components, redundancy, region_score
from grads_ray.selection.inputs import SelectionInputs, method_needs
from grads_ray.selection.kde import bandwidth, hdr_level, kde_density
from grads_ray.selection.methods import METHODS as REGISTRY
from grads_ray.selection.ranking import (
    cap_per_group,
    chauvenet_k,
    interleave,
    normal_scores,
    order_desc,
    rank01,
    robust_z,
    split_evenly,
    within_group_rank,
    zscore,
)

METHODS = list(REGISTRY)  # every registered method


# ------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("text,expected", [
    ("5%", Budget("fraction", 0.05)), ("0.5", Budget("fraction", 0.5)), ("500", Budget("count", 500)),
    ("20000 tokens", Budget("tokens", 20000)), ("1_000 tok", Budget("tokens", 1000)), (0.25, Budget("fraction", 0.25)),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["0%", "150%", "abc", "-3", "1.5"])
def test_bad_budgets(bad):
    with pytest.raises(ValueError):
        parse_budget(bad)


def take_within_budget(order, n_tokens, budget, n_total):
    """The budget alone (no quotas) over ``order``, as select() spends it."""
    return take_with_quotas(order, budget.costs(n_tokens), budget.limit(n_total))[0]


def test_token_budget_skips_what_does_not_fit():
    order = np.array([3, 0, 1, 2])
    tokens = np.array([50, 10, 40, 60])
    # costs in order: 60, 50, 10, 40
    assert take_within_budget(order, tokens, Budget("tokens", 120), 4).tolist() == [3, 0, 1]
    assert take_within_budget(order, tokens, Budget("tokens", 100), 4).tolist() == [3, 1]  # 0 skipped
    assert take_within_budget(order, tokens, Budget("tokens", 65), 4).tolist() == [3]
    assert take_within_budget(order, tokens, Budget("fraction", 0.5), 4).tolist() == [3, 0]
    assert take_within_budget(order, tokens, Budget("fraction", 0.3), 4).tolist() == [3, 0]  # rounds up
    assert Budget("fraction", 0.1).limit(30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats


def test_fits_matches_a_plain_walk():
    rng = np.random.default_rng(0)
    for _ in range(50):
        cost = rng.integers(1, 50, rng.integers(0, 40))
        limit = int(rng.integers(0, 400))
        left, expected = limit, []
        for c in cost.tolist():
            expected.append(c <= left)
            left -= c if c <= left else 0
        assert fits(cost, limit).tolist() == expected


def test_group_limits_split_exactly():
    assert group_limits(10, ["a", "b", "c"], {"a": 0.5, "*": 0.5}) == {"a": 5, "b": 3, "c": 2}
    assert sum(group_limits(7, ["a", "b", "c"], {"a": 1, "b": 1, "c": 1}).values()) == 7
    assert group_limits(10, ["a", "b"], {"a": 0.3}) == {"a": 3, "b": 0}  # b has no share
    assert split_evenly(5, np.array([1.0, 1.0, 2.0])).tolist() == [1, 1, 3]


def test_quotas_cap_each_source():
    order = np.arange(8)
    cost = np.ones(8, np.int64)
    source = np.array(list("aaaaabbb"))
    taken, over = take_with_quotas(order, cost, 4, source, {"a": 2, "b": 2})
    assert taken.tolist() == [0, 1, 5, 6]
    assert over.tolist() == [False, False, True, True, True, False, False, True]


# --------------------------------------------------------------------------------- ranking helpers
def _fnv_reference(text: str, seed: int) -> int:
    """FNV-1a then splitmix64 in plain Python integers: the hash as specified."""
    mask = (1 << 64) - 1

    def mix(h):
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        return h ^ (h >> 31)

    h = 0xCBF29CE484222325 ^ mix(seed & mask)
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & mask
    return mix(h)


def test_id_hash_is_the_specified_hash_of_each_id_alone(monkeypatch):
    from grads_ray import columns

    ids = ["a", "doc.jsonl:12", "", "ünïcode-id", "x" * 70]
    got = id_hash(ids, 7)
    assert got.tolist() == [_fnv_reference(t, 7) for t in ids]
    monkeypatch.setattr(columns, "ID_HASH_BLOCK", 2)  # in blocks of rows: the same hashes
    assert id_hash(ids, 7).tolist() == got.tolist()
    sliced = pa.chunked_array([pa.array(["zz"] + ids[:2]), pa.array(ids[2:])]).slice(1)
    assert id_hash(sliced, 7).tolist() == got.tolist()  # offsets, chunks and neighbours do not matter
    for arr in (pa.array(["zz", *ids]).slice(1), pa.array(["zz", *ids], pa.large_string()).slice(1)):
        assert id_hash(arr, 7).tolist() == got.tolist()  # 32- and 64-bit offsets, read in place
    assert id_hash(ids, 8).tolist() != got.tolist()


def test_normalisers_and_ranks_by_hand():
    assert rank01(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == pytest.approx([2.5 / 3, 0, 2.5 / 3, 1 / 3])
    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0])), [-1.224744871, 0, 1.224744871])
    # median 2, MAD 1 -> scale 1.4826; the outlier does not move the others
    np.testing.assert_allclose(robust_z(np.array([1.0, 2.0, 3.0, 2.0, 100.0])),
                               np.array([-1, 0, 1, 0, 98]) / 1.4826)
    ns = normal_scores(np.array([5.0, 1.0, 3.0]))
    assert ns[1] < ns[2] < ns[0] and ns[2] == pytest.approx(0.0) and ns[0] == pytest.approx(-ns[1])
    assert chauvenet_k(1000) == pytest.approx(3.4808, abs=1e-3)
    assert order_desc(np.array([1.0, np.nan, 2.0, 1.0]), np.array([9, 0, 0, 3], np.uint64)).tolist() == [2, 3, 0, 1]


def test_group_walks_by_hand():
    order = np.array([4, 0, 3, 1, 2])
    group = np.array([7, 8, 7, 8, 7])  # by index: the walk meets groups 7, 7, 8, 8, 7
    assert within_group_rank(order, group).tolist() == [0, 1, 0, 1, 2]
    kept, dropped = cap_per_group(order, group, 1)
    assert kept.tolist() == [4, 3] and dropped.tolist() == [0, 1, 2]
    g = np.array(["A", "A", "A", "B"])
    assert interleave(np.array([0, 1, 2, 3]), g, 0.0).tolist() == [0, 3, 1, 2]  # round-robin
    # proportional: A keys 1/6, 1/2, 5/6; B 1/2 -> B ties with A's second, which came first
    assert interleave(np.array([0, 1, 2, 3]), g, 1.0).tolist() == [0, 1, 3, 2]


# ------------------------------------------------------------------------------------------- GrADS
def test_binned_kde_matches_direct_sum():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 700), rng.normal(4, 0.5, 300)])
    at = np.linspace(-3, 6, 50)
    for rule in ("scott", "silverman", "0.3"):
        h = bandwidth(x, rule)
        direct = np.exp(-0.5 * ((at[:, None] - x[None]) / h) ** 2).sum(1) / (len(x) * h * np.sqrt(2 * np.pi))
        np.testing.assert_allclose(kde_density(x, h, at=at), direct, rtol=2e-3, atol=2e-5)  # peak ~0.25
    assert bandwidth(x, "scott") == pytest.approx(x.std() * len(x) ** -0.2)


def test_hdr_level_by_hand():
    assert hdr_level(np.array([0.1, 0.9, 0.5, 0.3]), 0.5) == 0.5  # the top half: 0.9 and 0.5
    assert hdr_level(np.array([0.1, 0.9, 0.5, 0.3]), 1.0) == 0.1


def test_gradient_signal_by_hand():
    cols = {"embedding.grad_norm": np.array([1.0, np.e, np.e ** 2]), "head.grad_norm": np.array([1.0, 1.0, np.e ** 3]),
            "embedding.grad_mean": np.array([-2.0, 0.0, 2.0]), "grad_norm": np.array([1.0, 2.0, 3.0])}
    signal, z = gradient_signal(cols, ["grad_norm", "grad_mean"], ["embedding", "head"])
    assert list(z) == ["embedding.grad_norm", "embedding.grad_mean", "head.grad_norm"]
    s = 1.224744871  # z of (0, 1, 2)
    np.testing.assert_allclose(z["embedding.grad_norm"], [-s, 0, s])
    np.testing.assert_allclose(z["head.grad_norm"], [-1 / 2 ** 0.5, -1 / 2 ** 0.5, 2 ** 0.5])
    np.testing.assert_allclose(z["embedding.grad_mean"], [-s, 0, s])  # asinh(x/2) is odd: z is symmetric
    np.testing.assert_allclose(signal, (2 * np.array([-s, 0, s]) + [-1 / 2 ** 0.5, -1 / 2 ** 0.5, 2 ** 0.5]) / 3)
    weighted, _ = gradient_signal(cols, ["grad_norm"], ["embedding", "head"], weights={"head.grad_norm": 0})
    np.testing.assert_allclose(weighted, z["embedding.grad_norm"])
    _, used = gradient_signal(cols, ["grad_norm"], ["layer9"])
    assert list(used) == ["grad_norm"]  # no group column: the overall statistic


def test_criteria_by_hand():
    z = {"head.grad_norm": np.array([0.0, 2.5, -2.5, 1.0]), "head.grad_max": np.array([0.0, 0.0, 0.0, 3.5])}
    sz = np.array([0.0, 0.5, -0.5, 2.1])
    ok, failed, k = criteria(z, sz, "2", "both")
    assert k == 2 and ok.tolist() == [True, False, False, False] and failed.tolist() == [0, 1, 1, 2]
    ok, _, _ = criteria(z, sz, "2", "both", {"grad_norm": "upper", "signal": "none", "head.grad_max": "lower"})
    assert ok.tolist() == [True, False, True, True]  # only the high tail of the norm is cut


def test_regions_by_hand():
    signal = np.array([0.0, 0.1, -0.1, 0.05, 5.0])
    fit = np.array([True, True, True, True, False])
    dense = region_score(signal, fit, "dense", 0.2)
    assert dense["region"][4] == 0.0 and dense["region"][:4].max() == 1.0  # outside the fitted support
    assert np.argmax(dense["region"]) in (0, 3)
    sparse = region_score(signal, fit, "sparse", 0.2)
    np.testing.assert_allclose(sparse["region"], 1 - dense["density"])
    hdr = region_score(signal, fit, "hdr", 0.2, mass=0.5)
    assert hdr["region"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]  # the densest half of the fitted four
    match = region_score(signal, fit, "match", 0.2, strata=2)
    assert match["stratum"].tolist() == [0, 1, 0, 0, 1] and not match["region"].any()


def test_redundancy_by_hand():
    base = np.array([3.0, 2.0, 1.0])
    nn_idx = np.array([[1, 2], [0, -1], [1, 0]])
    nn_sims = np.array([[0.9, 0.2], [0.9, -np.inf], [0.4, 0.2]])
    # 0 is best: nothing above it; 1 has 0 above at 0.9; 2 has 1 (0.4) and 0 (0.2) above
    np.testing.assert_allclose(redundancy(base, np.zeros(3, np.uint64), nn_idx, nn_sims), [0.0, 0.9, 0.4])


def _columns(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cols = {"loss": rng.gamma(2, 1, n), "n_tokens": rng.integers(10, 100, n),
            "loss_response_only": rng.gamma(2, 1.2, n), "grad_norm": rng.lognormal(0, 1, n)}
    for g in ("embedding", "head"):
        for s in ("grad_norm", "grad_std", "grad_max"):
            cols[f"{g}.{s}"] = rng.lognormal(0, 1, n)
        cols[f"{g}.grad_mean"] = rng.normal(0, 1e-3, n)
        cols[f"{g}.grad_min"] = -rng.lognormal(0, 1, n)
    return cols


def test_grads_score_is_the_documented_combination():
    n = 300
    cols = _columns(n, 0)
    rng = np.random.default_rng(1)
    div = rng.random(n)
    nn_idx, nn_sims = rng.integers(0, n, (n, 5)), rng.random((n, 5))
    cfg = GradsConfig(w_region=1.0, w_diversity=0.3, w_loss=0.2, w_redundancy=0.4)
    tb = id_hash([str(i) for i in range(n)], 0)
    c = grads_components(cols, cfg, tiebreak=tb, diversity=div, nn_idx=nn_idx, nn_sims=nn_sims)
    base = c["region"] + 0.3 * rank01(div) + 0.2 * rank01(cols["loss"])
    np.testing.assert_allclose(c["redundancy"], redundancy(base, tb, nn_idx, nn_sims))
    np.testing.assert_allclose(c["score"], base - 0.4 * c["redundancy"])
    assert c["in_band"].sum() < n and (c["criteria_failed"][~c["in_band"]] > 0).all()


# ----------------------------------------------------------------------------------------- FisherSFT
@pytest.mark.parametrize("seed", range(4))
def test_fisher_lazy_greedy_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, r, d, k, lam = 40, 3, 6, 15, 0.7
    f = rng.normal(size=(n, r, d)) * rng.lognormal(0, 1, (n, 1, 1))
    picked, gain, gain0 = fisher_greedy(f, np.ones(n, np.int64), k, lam)
    assert picked.tolist() == brute_force_greedy(f, k, lam)
    # the gains are the objective's increments, the first is the gain alone
    values = [log_det_objective(f, picked[:j], lam) for j in range(k + 1)]
    np.testing.assert_allclose(gain, np.diff(values), rtol=1e-9)
    assert gain0[picked[0]] == pytest.approx(gain[0])


def test_fisher_stochastic_greedy_is_close_and_budgeted_by_tokens():
    rng = np.random.default_rng(5)
    n, k = 400, 40
    f = rng.normal(size=(n, 4, 8))
    exact, _, _ = fisher_greedy(f, np.ones(n, np.int64), k, 1.0)
    approx, _, _ = fisher_greedy(f, np.ones(n, np.int64), k, 1.0, epsilon=0.01, seed=3)
    again, _, _ = fisher_greedy(f, np.ones(n, np.int64), k, 1.0, epsilon=0.01, seed=3)
    assert approx.tolist() == again.tolist() and len(approx) == k
    base = log_det_objective(f, [], 1.0)
    assert log_det_objective(f, approx, 1.0) - base >= 0.97 * (log_det_objective(f, exact, 1.0) - base)
    tokens = rng.integers(5, 50, n)
    picked, _, _ = fisher_greedy(f, tokens, 500, 1.0)
    left = 500 - tokens[picked].sum()
    assert left >= 0 and (tokens[np.setdiff1d(np.arange(n), picked)] > left).all()


def test_fisher_greedy_on_memory_mapped_factors_equals_in_memory(tmp_path):
    """The select stage's spill (factors over select.memory_mb, an np.memmap read a few rows at a
    time) gives the same picks and gains as factors in memory, lazy and stochastic; λ=auto computed
    in blocks equals the formula."""
    from grads_ray.selection.fisher import fisher_lambda

    rng = np.random.default_rng(11)
    n = 300
    f = (rng.normal(size=(n, 3, 7)) * rng.lognormal(0, 1, (n, 1, 1))).astype(np.float32)
    mapped = np.memmap(tmp_path / "f.f32", np.float32, "w+", shape=f.shape)
    mapped[:] = f
    mapped.flush()
    mapped = np.memmap(tmp_path / "f.f32", np.float32, "r", shape=f.shape)
    tokens = rng.integers(5, 50, n)
    for kw in ({}, {"epsilon": 0.05, "seed": 2}, {"batch": 3}):
        a = fisher_greedy(f, tokens, 900, 0.5, **kw)
        b = fisher_greedy(mapped, tokens, 900, 0.5, **kw)
        assert a[0].tolist() == b[0].tolist() and len(a[0]) > 10, kw
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
    f64 = f.astype(np.float64)
    assert fisher_lambda(mapped, "auto") == pytest.approx((f64 ** 2).sum() / (n * 7), rel=1e-12)


# --------------------------------------------------------------------------------------- baselines
def test_baselines_by_hand():
    np.testing.assert_allclose(ifd(np.array([1.0, 2.0, 1.0]), np.array([2.0, 1.0, 0.0])), [0.5, 2.0, np.nan])
    g = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = np.array([[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(less_score(g, t, "mean"), [2 ** -0.5, 2 ** -0.5, 1.0])
    np.testing.assert_allclose(less_score(g, t, "max"), [1.0, 1.0, 2 ** -0.5])
    u = random_score(id_hash([str(i) for i in range(1000)], 0))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.05


# ----------------------------------------------------------------------------------------- select
def _inputs(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    nn_idx = np.stack([rng.permutation(n)[:6] for _ in range(n)])
    return {"cols": _columns(n, seed), "ids": [f"doc{i:05d}" for i in range(n)],
            "similarity": {"dup_group": rng.integers(0, int(n * 0.8), n), "diversity": rng.random(n),
                           "cluster": rng.integers(0, 12, n), "nn_idx": nn_idx, "nn_sims": rng.random((n, 6))},
            "fisher_factors": rng.normal(size=(n, 2, 6)), "grad_proj": rng.normal(size=(n, 16)),
            "target_proj": rng.normal(size=(4, 16)),
            "source": np.array(["law.jsonl", "med.jsonl", "fin.jsonl"], dtype=object)[rng.integers(0, 3, n)]}


def _permuted(inp: dict, perm: np.ndarray) -> dict:
    """The same corpus with its rows in another order (as other shards or actors would give)."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    sim = {k: v[perm] for k, v in inp["similarity"].items()}
    sim["nn_idx"] = inv[inp["similarity"]["nn_idx"][perm]]
    return {"cols": {k: v[perm] for k, v in inp["cols"].items()}, "ids": [inp["ids"][i] for i in perm],
            "similarity": sim, "fisher_factors": inp["fisher_factors"][perm], "grad_proj": inp["grad_proj"][perm],
            "target_proj": inp["target_proj"], "source": inp["source"][perm]}


def _run(inp: dict, budget: Budget, cfg: SelectConfig, seed: int = 3) -> dict:
    kwargs = {k: v for k, v in inp.items() if k not in ("cols", "ids")}
    return select(SelectionInputs(inp["cols"], inp["ids"], **kwargs), budget, cfg, seed)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_subset_whatever_the_row_order(method):
    inp = _inputs(500)
    cfg = SelectConfig(method=method, quotas={"law.jsonl": 0.5, "*": 0.5})
    a = _run(inp, Budget("fraction", 0.1), cfg)
    perm = np.random.default_rng(9).permutation(500)
    b = _run(_permuted(inp, perm), Budget("fraction", 0.1), cfg)
    ranked = lambda res, ids: {ids[i]: int(res["rank"][i]) for i in np.flatnonzero(res["selected"])}  # noqa: E731
    assert ranked(a, inp["ids"]) == ranked(b, [inp["ids"][i] for i in perm])
    if method == "random":  # the seed is what draws the random subset
        assert ranked(a, inp["ids"]) != ranked(_run(inp, Budget("fraction", 0.1), cfg, seed=4), inp["ids"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [Budget("fraction", 0.05), Budget("count", 37), Budget("tokens", 3000)])
def test_budgets_are_met_exactly_and_every_row_has_one_verdict(method, budget):
    inp = _inputs(600, seed=1)
    cfg = SelectConfig(method=method)
    res = _run(inp, budget, cfg)
    sel, tokens = res["selected"], inp["cols"]["n_tokens"]
    assert ((res["reason"] == "") == sel).all()
    assert set(res["reason"][~sel]) <= {"duplicate", "outside_band", "ifd_above_max", "over_budget"}
    assert sorted(res["rank"][sel].tolist()) == list(range(sel.sum()))
    if budget.kind == "tokens":
        left = budget.limit(600) - tokens[sel].sum()
        assert left >= 0
        eligible = ~sel & (res["reason"] == "over_budget")
        assert (tokens[eligible] > left).all()  # nothing that was passed over would still fit
    else:
        assert sel.sum() == budget.limit(600)


def test_quotas_are_shares_of_the_budget():
    inp = _inputs(900, seed=2)
    for method in METHODS:
        res = _run(inp, Budget("count", 60), SelectConfig(method=method, quotas={"law.jsonl": 0.5, "*": 0.5}))
        src = inp["source"][res["selected"]]
        assert (src == "law.jsonl").sum() == 30 and len(src) == 60, method
        assert {"over_source_quota"} <= set(res["reason"]), method


def test_a_quota_for_an_unknown_source_is_an_error():
    with pytest.raises(ValueError, match="'law.json', which is no source"):
        _run(_inputs(50), Budget("count", 5), SelectConfig(method="random", quotas={"law.json": 0.5}))


def test_grads_band_fill_duplicates_and_clusters():
    inp = _inputs(800, seed=3)
    groups = inp["similarity"]["dup_group"]
    cfg = SelectConfig(method="grads", grads=GradsConfig(k="1.5"))
    res = _run(inp, Budget("fraction", 0.5), cfg)
    sel = res["selected"]
    assert sel.sum() == 400
    assert np.bincount(groups[sel]).max() == 1  # at most one per near-duplicate group
    in_band_ranks = res["rank"][sel & res["in_band"]]
    out_ranks = res["rank"][sel & ~res["in_band"]]
    assert len(out_ranks) and in_band_ranks.max() < out_ranks.min()  # filled from outside the band last
    strict = _run(inp, Budget("fraction", 0.5), replace(cfg, fill=False))
    assert not (strict["selected"] & ~strict["in_band"]).any() and strict["selected"].sum() < 400
    # clusters: with equal shares (alpha 0) a small selection spreads over every cluster
    even = _run(inp, Budget("count", 24), replace(cfg, grads=GradsConfig(cluster_alpha=0.0)))
    assert set(inp["similarity"]["cluster"][even["selected"]]) == set(range(12))
    off = _run(inp, Budget("count", 24), replace(cfg, grads=GradsConfig(cluster_alpha=-1.0)))
    assert math.isclose(off["score"][off["selected"]].min(), np.sort(off["score"][off["in_band"]
                                                                            & (off["reason"] != "duplicate")])[-24:].min())


@pytest.mark.parametrize("method", ["grads", "loss", "random"])
def test_greedy_similarity_pass_keeps_the_selection_apart(method):
    from grads_ray.similarity.index import l2_normalize

    inp = _inputs(400, seed=6)
    rng = np.random.default_rng(6)
    base = rng.normal(size=(200, 12))
    vec = np.concatenate([base, base + 0.05 * rng.normal(size=(200, 12))])  # every row has a near twin
    vec = l2_normalize(vec - vec.mean(0))
    cfg = SelectConfig(method=method, max_similarity=0.9, dedup="false")
    res = select(SelectionInputs(inp["cols"], inp["ids"], similarity=inp["similarity"], vectors=vec),
                 Budget("count", 60), cfg, 3)
    chosen = np.flatnonzero(res["selected"])
    sims = vec[chosen] @ vec[chosen].T
    np.fill_diagonal(sims, -1)
    assert len(chosen) == 60 and sims.max() <= 0.9
    assert "too_similar" in set(res["reason"]) and ((res["reason"] == "") == res["selected"]).all()
    off = select(SelectionInputs(inp["cols"], inp["ids"], similarity=inp["similarity"]), Budget("count", 60),
                 replace(cfg, max_similarity=0.0), 3)
    twins = vec[np.flatnonzero(off["selected"])] @ vec[np.flatnonzero(off["selected"])].T
    np.fill_diagonal(twins, -1)
    assert twins.max() > 0.9  # without the pass, some twins are taken together


def test_ifd_takes_prompt_helped_examples_first():
    inp = _inputs(200, seed=4)
    res = _run(inp, Budget("count", 20), SelectConfig(method="ifd"))
    chosen = res["ifd"][res["selected"]]
    assert (chosen < 1).all()
    assert chosen.min() >= np.sort(res["ifd"][res["ifd"] < 1])[-20]


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_rows_are_never_selected_and_change_nothing_else(method):
    """NaN/inf in the loss, a gradient statistic or the score stage's flag: the row gets
    ``nonfinite``, and the rest is selected exactly as if the row had never been there (its
    neighbour links dropped: checked against a subset built by hand)."""
    n = 400
    inp = _inputs(n, seed=5)
    bad = np.array([3, 17, 18, 150, 222, 301, 399])
    inp["cols"]["loss"][bad[:2]] = np.nan
    inp["cols"]["grad_norm"][bad[2]] = np.inf
    inp["cols"]["head.grad_max"][bad[3]] = -np.inf
    inp["cols"]["embedding.grad_mean"][bad[4]] = np.nan
    inp["cols"]["finite"] = np.ones(n, bool)
    inp["cols"]["finite"][bad[5:]] = False
    inp["similarity"]["nn_idx"][:, 0] = bad[np.arange(n) % len(bad)]  # every row has a bad neighbour
    cfg = SelectConfig(method=method, max_per_dup_group=1)
    res = _run(inp, Budget("fraction", 0.2), cfg)
    assert not res["selected"][bad].any() and set(res["reason"][bad]) == {"nonfinite"}
    assert "nonfinite" not in set(res["reason"][np.setdiff1d(np.arange(n), bad)])

    good = [i for i in range(n) if i not in set(bad)]
    where = {old: new for new, old in enumerate(good)}
    sub = {"cols": {k: v[good] for k, v in inp["cols"].items()}, "ids": [inp["ids"][i] for i in good],
           "similarity": {k: v[good] for k, v in inp["similarity"].items()},
           "fisher_factors": inp["fisher_factors"][good], "grad_proj": inp["grad_proj"][good],
           "target_proj": inp["target_proj"], "source": inp["source"][good]}
    sub["similarity"]["nn_idx"] = np.array([[where.get(int(j), -1) for j in row] for row in inp["similarity"]["nn_idx"][good]])
    ref = _run(sub, Budget("fraction", 0.2), cfg)
    np.testing.assert_array_equal(res["rank"][good], ref["rank"])
    np.testing.assert_array_equal(res["reason"][good], ref["reason"])
    np.testing.assert_array_equal(res["score"][good], ref["score"])


def test_each_method_declares_what_it_reads_and_a_missing_input_is_named():
    """method_needs is the one declaration: the select stage reads by it, the stage table derives
    select's inputs from it, and select() refuses inputs that lack what it names."""
    need = {m: method_needs(SelectConfig(method=m)) for m in METHODS}
    assert need["grads"].neighbours and "head.grad_norm" in need["grads"].columns and not need["grads"].factors
    assert need["fisher"].factors and not need["fisher"].neighbours
    assert need["less"].grad_proj and need["less"].target
    assert need["ifd"].columns == ("loss_response_only",) and need["grad_norm"].columns == ("grad_norm",)
    assert not any(need[m].neighbours or need[m].vectors for m in ("random", "loss"))
    assert method_needs(SelectConfig(method="loss", dedup="true")).neighbours  # the near-duplicate cap
    assert method_needs(SelectConfig(method="loss", max_similarity=0.9)).vectors
    inp = _inputs(50)
    for method, key, message in (("fisher", "fisher_factors", "fisher_factor features"),
                                 ("less", "target_proj", "LESS needs projected gradients of the corpus and of the target set"),
                                 ("grads", "similarity", "similarity stage's neighbours")):
        given = {k: v for k, v in inp.items() if k not in ("cols", "ids", key)}
        with pytest.raises(ValueError, match=message):
            select(SelectionInputs(inp["cols"], inp["ids"], **given), Budget("count", 5), SelectConfig(method=method), 0)
    with pytest.raises(ValueError, match="max_similarity"):
        select(SelectionInputs(inp["cols"], inp["ids"]), Budget("count", 5),
               SelectConfig(method="random", max_similarity=0.9), 0)


def test_selection_inputs_rows_renumber_the_neighbours():
    inp = _inputs(6)
    inp["similarity"]["nn_idx"] = np.array([[1, 5], [0, 2], [3, -1], [2, 4], [5, 0], [4, 1]])
    sub = SelectionInputs(inp["cols"], inp["ids"], **{k: v for k, v in inp.items() if k not in ("cols", "ids")}
                          ).rows(np.array([0, 2, 4, 5]))
    assert sub.ids.to_pylist() == ["doc00000", "doc00002", "doc00004", "doc00005"]
    np.testing.assert_array_equal(sub.similarity["nn_idx"], [[-1, 3], [-1, -1], [3, 0], [2, -1]])
    np.testing.assert_array_equal(sub.fisher_factors, inp["fisher_factors"][[0, 2, 4, 5]])
    np.testing.assert_array_equal(sub.target_proj, inp["target_proj"])  # not per row
    assert list(sub.source) == list(inp["source"][[0, 2, 4, 5]]) and len(sub) == 4


def _blocks(nn_idx, nn_sims, seed):
    """The same k-NN lists as Neighbours read in shuffled blocks of odd sizes (as from parts)."""
    from grads_ray.selection.inputs import Neighbours

    order = np.random.default_rng(seed).permutation(len(nn_idx))
    cuts = np.sort(np.random.default_rng(seed + 1).choice(np.arange(1, len(nn_idx)), 4, replace=False))
    pieces = np.split(order, cuts)
    return Neighbours(lambda: iter([(p, nn_idx[p], nn_sims[p]) for p in pieces]), len(nn_idx))


@pytest.mark.parametrize("seed", range(3))
def test_grads_components_read_in_blocks_and_on_demand_equal_in_memory(seed):
    """Neighbours in blocks and PartColumns give the components of in-memory arrays; the criteria
    counted column by column equal criteria() on the float64 z; the reported z are their float32."""
    from grads_ray.selection.inputs import PartColumns
    from grads_ray.selection.ranking import NORMALIZERS

    n = 257
    cols = _columns(n, seed)
    rng = np.random.default_rng(seed)
    nn_idx, nn_sims = rng.integers(-1, n, (n, 7)), rng.random((n, 7)).astype(np.float32)
    cfg = GradsConfig(w_redundancy=0.5, k=1.5, directions={"head.grad_max": "upper"})
    tb = id_hash([str(i) for i in range(n)], seed)
    reads = []
    lazy = PartColumns(list(cols), lambda c: reads.append(c) or cols[c].copy(), cached=("loss",))
    want = grads_components(cols, cfg, tiebreak=tb, diversity=None, nn_idx=nn_idx, nn_sims=nn_sims)
    got = grads_components(lazy, cfg, tiebreak=tb, diversity=None, nn_idx=_blocks(nn_idx, nn_sims, seed))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert reads.count("loss") == 1 and "n_tokens" not in reads
    assert all(reads.count(c) == 1 for c in reads)  # each column read once (asking `in` reads none)
    signal, z = gradient_signal(cols, cfg.stats, cfg.groups, cfg.normalize, cfg.stat_weights)
    in_band, failed, _ = criteria(z, NORMALIZERS[cfg.normalize](signal), cfg.k, cfg.direction, cfg.directions)
    np.testing.assert_array_equal(want["criteria_failed"], failed)
    assert 0 < in_band.sum() < n and (want["in_band"] == in_band).all()
    for c, values in z.items():
        assert want[f"signal.{c}"].dtype == np.float32
        np.testing.assert_array_equal(want[f"signal.{c}"], values.astype(np.float32))


def test_selection_inputs_rows_of_blocks_and_part_columns_equal_in_memory():
    """rows(keep), twice over, renumbers Neighbours blocks as it does (N, k) arrays, and restricts
    PartColumns as it does a dict."""
    from grads_ray.selection.inputs import Neighbours, PartColumns

    n = 40
    rng = np.random.default_rng(5)
    nn_idx, nn_sims = rng.integers(-1, n, (n, 4)), rng.random((n, 4)).astype(np.float32)
    cols = _columns(n, 5)
    ids = [f"d{i:03d}" for i in range(n)]
    plain = SelectionInputs(cols, ids, similarity={"nn_idx": nn_idx, "nn_sims": nn_sims})
    lazy = SelectionInputs(PartColumns(list(cols), lambda c: cols[c]), ids,
                           similarity={"neighbours": _blocks(nn_idx, nn_sims, 9)})
    keep1, keep2 = np.flatnonzero(rng.random(n) < 0.7), None
    keep2 = np.flatnonzero(rng.random(len(keep1)) < 0.7)
    a, b = plain.rows(keep1).rows(keep2), lazy.rows(keep1).rows(keep2)
    assert len(a) == len(b) == len(keep2)
    for c in cols:
        np.testing.assert_array_equal(a.columns[c], b.columns[c])
    blocks = list(b.similarity["neighbours"])
    pos = np.concatenate([p for p, _, _ in blocks])
    assert sorted(pos.tolist()) == list(range(len(keep2)))
    idx = np.concatenate([i for _, i, _ in blocks])[np.argsort(pos)]
    sims = np.concatenate([s for _, _, s in blocks])[np.argsort(pos)]
    np.testing.assert_array_equal(idx, a.similarity["nn_idx"])
    np.testing.assert_array_equal(sims, a.similarity["nn_sims"])
    assert isinstance(b.similarity["neighbours"], Neighbours)


@pytest.mark.parametrize("method", METHODS)
def test_selection_out_of_core_equals_in_memory(method, tmp_path):
    """The select stage's way: stats columns read on demand (PartColumns), k-NN lists in blocks
    (Neighbours), results spilled to files (ColumnSpill) — with non-finite rows, so that rows(keep)
    and the write-back of every column run too: every result column equals the in-memory one."""
    from grads_ray.selection.inputs import PartColumns
    from grads_ray.selection.spill import ColumnSpill

    n = 300
    inp = _inputs(n, seed=11)
    inp["cols"]["loss"][[4, 77]] = np.nan
    inp["cols"]["finite"] = np.ones(n, bool)
    inp["cols"]["finite"][123] = False
    cfg = SelectConfig(method=method, max_per_dup_group=1)
    sim = {k: v for k, v in inp["similarity"].items() if k not in ("nn_idx", "nn_sims")}
    sim["neighbours"] = _blocks(inp["similarity"]["nn_idx"], inp["similarity"]["nn_sims"].astype(np.float32), 2)
    want_f32 = _run({**inp, "similarity": {**inp["similarity"], "nn_sims": inp["similarity"]["nn_sims"].astype(np.float32)}},
                    Budget("fraction", 0.3), cfg)  # the blocks carry float32 cosines, as the stage's files do
    spill = ColumnSpill(tmp_path / "spill")
    kwargs = {k: v for k, v in inp.items() if k not in ("cols", "ids", "similarity")}
    got = select(SelectionInputs(PartColumns(list(inp["cols"]), lambda c: inp["cols"][c].copy(), cached=("loss",)),
                                 inp["ids"], similarity=sim, **kwargs), Budget("fraction", 0.3), cfg, 3, result=spill)
    assert got is spill and set(got) == set(want_f32)
    for k in want_f32:
        np.testing.assert_array_equal(got[k], want_f32[k], err_msg=k)
        assert np.asarray(got[k]).dtype == np.asarray(want_f32[k]).dtype
        np.testing.assert_array_equal(spill.rows(k, 7, 19), np.asarray(want_f32[k])[7:19])
    numeric = [k for k in got if np.asarray(got[k]).dtype.kind in "biuf"]
    assert len(list((tmp_path / "spill").iterdir())) == len(numeric)  # a column set again leaves no stale file


def test_source_codes_name_only_the_sources_present():
    """A dictionary array (the select stage's sources) whose dictionary names a source no row has
    (its rows all dropped as non-finite): that source gets no code, so no quota share."""
    from grads_ray.selection.choose import source_codes

    code, names = source_codes(pa.DictionaryArray.from_arrays(pa.array([0, 2, 2, 0], pa.int32()),
                                                              pa.array(["a.jsonl", "b.jsonl", "c.jsonl"])))
    assert names == ["a.jsonl", "c.jsonl"] and code.tolist() == [0, 1, 1, 0]
    code, names = source_codes(np.array(["x", "y", "x"], dtype=object))
    assert [names[c] for c in code] == ["x", "y", "x"]


# ------------------------------------------------------------------------------- GrADS's variants (issue 22)
def _variant(name: str) -> SelectConfig:
    from grads_ray.config import Config, with_settings
    from grads_ray.selection.variants import variant_settings

    base = Config()
    return with_settings(base, variant_settings("grads", name, base.select)).select


def test_grads_core_is_the_densest_signal_and_nothing_else():
    """core: the budget's highest KDE densities of the signal, ties by the seeded hash; no band, no
    duplicate cap, no diversity, redundancy or cluster quotas (a plain reference, not select's path)."""
    inp = _inputs(400, seed=2)
    res = _run(inp, Budget("fraction", 0.1), _variant("core"))
    cfg = GradsConfig()
    signal, _ = gradient_signal(inp["cols"], cfg.stats, cfg.groups, cfg.normalize)
    dens = kde_density(signal, bandwidth(signal, "scott"), at=signal)
    want = order_desc(dens, id_hash(inp["ids"], 3))[:40]
    assert np.flatnonzero(res["selected"]).tolist() == sorted(want.tolist())
    assert set(res["reason"][~res["selected"]]) == {"over_budget"}
    np.testing.assert_array_equal(res["score"], res["region"])  # diversity is reported, weighted 0
    assert not res["redundancy"].any()


def test_each_grads_switch_adds_its_own_part():
    inp = _inputs(400, seed=2)
    budget = Budget("fraction", 0.1)
    core = _run(inp, budget, _variant("core"))
    band = _run(inp, budget, _variant("core+band"))
    assert "outside_band" in set(band["reason"]) and "outside_band" not in set(core["reason"])
    dedup = _run(inp, budget, _variant("core+dedup"))
    groups = inp["similarity"]["dup_group"][dedup["selected"]]
    assert "duplicate" in set(dedup["reason"]) and len(set(groups)) == len(groups)
    div = _run(inp, budget, _variant("core+diversity"))
    np.testing.assert_allclose(div["score"], core["region"] + 0.5 * rank01(inp["similarity"]["diversity"]))
    red = _run(inp, budget, _variant("core+redundancy"))
    assert red["redundancy"].any() and not core["redundancy"].any()
    np.testing.assert_allclose(red["score"], core["region"] - 0.5 * red["redundancy"])
    clusters = _run(inp, budget, _variant("core+clusters"))
    np.testing.assert_allclose(clusters["score"], core["score"])  # same scores, another order
    assert not np.array_equal(clusters["selected"], core["selected"])
    per_cluster = np.bincount(inp["similarity"]["cluster"][clusters["selected"]], minlength=12)
    assert per_cluster.min() >= 1  # quotas ∝ |c|^0.5 give every cluster a share at 40 picks
    norm = _run(inp, budget, _variant("core+norm"))
    assert {k for k in norm if k.startswith("signal.")} == {"signal.embedding.grad_norm", "signal.head.grad_norm"}
    default = _run(inp, budget, SelectConfig())  # the defaults since the ablation: all but diversity and clusters
    assert np.array_equal(_run(inp, budget, _variant("all-diversity-clusters"))["rank"], default["rank"])
    assert not np.array_equal(_run(inp, budget, _variant("all"))["rank"], default["rank"])
