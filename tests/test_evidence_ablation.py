"""The evidence benchmark's ablation arithmetic (issue 22): paired differences over seeds and the
report's tables, on made-up runs (the runs themselves are benchmarks/evidence.py --ablation)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import evidence as ev  # noqa: E402


def _run(seed, strategy, method, variant, warmup, loss, chrf, noisy, forgetting=0.07):
    return {"seed": seed, "strategy": strategy, "method": method, "variant": variant, "warmup": warmup,
            "after": {"domain_loss": loss, "chrf": chrf, "bleu": 0.5, "rougeL": 9.0}, "forgetting": forgetting,
            "noisy_share": noisy}


def test_paired_deltas_pair_by_seed_and_warmup():
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.5), (2, 1.0)):  # a per-seed shift that pairing removes
        rows += [_run(seed, "random-5pct", "random", "", 0.1, 5.0 + shift, 10, 0.2),
                 _run(seed, "grads-core-5pct", "grads", "core", 0.1, 4.9 + shift + 0.01 * seed, 11, 0.15),
                 _run(seed, "grads-core-5pct", "grads", "core", 1.0, 4.0 + shift, 12, 0.10)]
    d = ev.paired_deltas(rows, "random-5pct", "domain_loss")
    m, sd, n = d[(0.1, "grads-core-5pct")]
    assert n == 3 and m == pytest.approx(-0.09) and sd == pytest.approx(0.01)  # not the 0.5 seed spread
    assert (1.0, "grads-core-5pct") not in d  # no random run at that warm-up to pair with
    any_warmup = ev.paired_deltas(rows, "random-5pct", "domain_loss", by_warmup=False)
    assert any_warmup[(1.0, "grads-core-5pct")] == pytest.approx((-1.0, 0.0, 3))  # random paired by seed only
    noisy = ev.paired_deltas(rows, "random-5pct", "noisy_share")[(0.1, "grads-core-5pct")]
    assert noisy[0] == pytest.approx(-0.05)


def test_paired_deltas_skip_missing_metrics():
    rows = [_run(0, "random-5pct", "random", "", 0.1, 5.0, 10, 0.2),
            _run(0, "grads-all-5pct", "grads", "all", 0.1, 4.0, 10, 0.2)]
    rows[1]["after"]["meteor"] = 3.0  # random has none: nothing to pair
    assert ev.paired_deltas(rows, "random-5pct", "meteor") == {}
    rows[1]["after"]["chrf"] = math.nan
    assert ev.paired_deltas(rows, "random-5pct", "chrf") == {}


def test_ablation_tables():
    rows = []
    for seed in (0, 1):
        rows += [_run(seed, "random-5pct", "random", "", 0.1, 5.0, 10, 0.2),
                 _run(seed, "grads-core-5pct", "grads", "core", 0.1, 5.0 - 0.1 * seed, 10, 0.2),
                 _run(seed, "grads-core+dedup-5pct", "grads", "core+dedup", 0.1, 4.8, 10, 0.1),
                 _run(seed, "grads-core-5pct", "grads", "core", 1.0, 4.5, 10, 0.1)]
    t = ev.ablation_tables(rows)
    assert "| 10% | grads-core+dedup-5pct | 4.800 ± 0.000 |" in t["runs"]
    assert "| 100% | grads-core-5pct | 4.500 ± 0.000 |" in t["runs"]
    # core+dedup - core: -0.2 and -0.1 -> -0.150 ± 0.071; noisy -0.1 both seeds
    assert "| 10% | grads-core+dedup-5pct | -0.150 ± 0.071 |" in t["versus_core"]
    assert "-0.100 ± 0.000 |" in t["versus_core"].splitlines()[2]
    assert "random" not in t["versus_core"]
    assert "| 10% | grads-core-5pct | -0.050 ± 0.071 |" in t["versus_random"]
    assert "| 100% | grads-core-5pct | -0.500 ± 0.000 |" in t["versus_random"]
    assert ev.ablation_strategies("5", True)[0] == "random:5%"
    assert "grads:core+norm:5%" in ev.ablation_strategies("5", False)
    assert not any(s.startswith("random") for s in ev.ablation_strategies("5", False))
