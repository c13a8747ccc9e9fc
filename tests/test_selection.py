"""Budgets, the GrADS components (KDE against a direct sum), and deterministic selection."""

from __future__ import annotations

import numpy as np
import pytest

from grads_ray.selection.budget import Budget, parse_budget, take_within_budget
from grads_ray.selection.grads import bandwidth, gradient_signal, kde_density, zscore
from grads_ray.selection.select import cap_per_group, select


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


def test_token_budget_skips_what_does_not_fit():
    order = np.array([3, 0, 1, 2])
    tokens = np.array([50, 10, 40, 60])
    # costs in order: 60, 50, 10, 40
    assert take_within_budget(order, tokens, Budget("tokens", 120), 4).tolist() == [3, 0, 1]
    assert take_within_budget(order, tokens, Budget("tokens", 100), 4).tolist() == [3, 1]  # 0 skipped
    assert take_within_budget(order, tokens, Budget("tokens", 65), 4).tolist() == [3]
    assert take_within_budget(order, tokens, Budget("fraction", 0.5), 4).tolist() == [3, 0]
    assert take_within_budget(order, tokens, Budget("fraction", 0.3), 4).tolist() == [3, 0]  # rounds up


def test_binned_kde_matches_direct_sum():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 700), rng.normal(4, 0.5, 300)])
    for rule in ("scott", "silverman", "0.3"):
        h = bandwidth(x, rule)
        direct = np.exp(-0.5 * ((x[:, None] - x[None]) / h) ** 2).sum(1) / (len(x) * h * np.sqrt(2 * np.pi))
        np.testing.assert_allclose(kde_density(x, h), direct, rtol=2e-3)
    assert bandwidth(x, "scott") == pytest.approx(x.std() * len(x) ** -0.2)


def _columns(n: int, seed: int):
    rng = np.random.default_rng(seed)
    cols = {"loss": rng.gamma(2, 1, n), "n_tokens": rng.integers(10, 100, n)}
    for s in ("grad_norm", "grad_std", "grad_max"):
        cols[s] = rng.lognormal(0, 1, n)
        cols[f"embedding.{s}"] = rng.lognormal(0, 1, n)
        cols[f"head.{s}"] = rng.lognormal(0, 1, n)
    cols["grad_min"] = -rng.lognormal(0, 1, n)
    return cols


GRADS = {"stats": ["grad_norm", "grad_std", "grad_max", "grad_min"], "groups": ["embedding", "head"],
         "tail_k": 2.0, "bandwidth_rule": "scott", "w_density": 1.0, "w_diversity": 0.5, "w_loss": 0.0}


def test_gradient_signal_reads_group_columns_first():
    cols = _columns(50, 0)
    signal, used = gradient_signal(cols, ["grad_norm", "grad_min"], ["embedding", "head"])
    assert used == ["embedding.grad_norm", "head.grad_norm"]
    expected = (zscore(np.log(cols["embedding.grad_norm"])) + zscore(np.log(cols["head.grad_norm"]))) / 2
    np.testing.assert_allclose(signal, expected, atol=1e-9)
    _, used = gradient_signal(cols, ["grad_min"], ["embedding"])
    assert used == ["grad_min"]  # no group column: the overall statistic


@pytest.mark.parametrize("method", ["grads", "random"])
def test_selection_is_deterministic_and_accounts_for_every_row(method):
    n = 400
    cols = _columns(n, 1)
    rng = np.random.default_rng(2)
    div, groups = rng.random(n), rng.integers(0, 300, n)
    kwargs = dict(diversity=div, dup_group=groups, max_per_dup_group=1, grads=GRADS)
    a = select(cols, Budget("fraction", 0.1), method, 7, **kwargs)
    b = select(cols, Budget("fraction", 0.1), method, 7, **kwargs)
    c = select(cols, Budget("fraction", 0.1), method, 8, **kwargs)
    assert (a["rank"] == b["rank"]).all()
    assert a["selected"].sum() == 40 and sorted(a["rank"][a["selected"]].tolist()) == list(range(40))
    assert all((r == "") == s for r, s in zip(a["reason"], a["selected"], strict=True))
    if method == "random":
        assert not (a["rank"] == c["rank"]).all()
    else:
        assert set(a["reason"]) == {"", "outside_band", "duplicate", "over_budget"}
        assert (np.abs(a["signal_z"][a["selected"]]) <= 2.0).all()
        chosen_groups = groups[a["selected"]]
        assert len(set(chosen_groups.tolist())) == len(chosen_groups)  # one per near-duplicate group
        top = np.argsort(-np.where(a["selected"], a["score"], -np.inf))[:40]
        assert set(top.tolist()) == set(np.nonzero(a["selected"])[0].tolist())


def test_cap_per_group_keeps_the_first_members():
    kept, dropped = cap_per_group(np.array([4, 1, 3, 0, 2]), np.array([0, 0, 1, 1, 0]), 2)
    # groups by element: 4->0, 1->0, 3->1, 0->0 (third of group 0: dropped), 2->1
    assert kept.tolist() == [4, 1, 3, 2] and dropped.tolist() == [0]
