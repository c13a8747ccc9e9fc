"""The evidence benchmark's ablation arithmetic (issue 22): paired differences over seeds and the
report's tables, on made-up runs (the runs themselves are benchmarks/evidence.py --ablation)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import evidence as ev  # noqa: E402


def _run(seed, strategy, method, variant, warmup, loss, chrf, noisy, forgetting=0.07, budget="5%", view="epochs"):
    return {"seed": seed, "strategy": strategy, "method": method, "variant": variant, "warmup": warmup,
            "budget": budget, "view": view,
            "after": {"domain_loss": loss, "chrf": chrf, "bleu": 0.5, "rougeL": 9.0}, "forgetting": forgetting,
            "noisy_share": noisy}


def test_paired_deltas_pair_by_seed_and_warmup():
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.5), (2, 1.0)):  # a per-seed shift that pairing removes
        rows += [_run(seed, "random-5pct", "random", "", 0.1, 5.0 + shift, 10, 0.2),
                 _run(seed, "grads-core-5pct", "grads", "core", 0.1, 4.9 + shift + 0.01 * seed, 11, 0.15),
                 _run(seed, "grads-core-5pct", "grads", "core", 1.0, 4.0 + shift, 12, 0.10)]
    d = ev.paired_deltas(rows, ev.is_random, "domain_loss")
    m, sd, n = d[(0.1, "5%", "epochs", "grads-core-5pct")]
    assert n == 3 and m == pytest.approx(-0.09) and sd == pytest.approx(0.01)  # not the 0.5 seed spread
    assert (1.0, "5%", "epochs", "grads-core-5pct") not in d  # no random run at that warm-up to pair with
    any_warmup = ev.paired_deltas(rows, ev.is_random, "domain_loss", ("budget", "view"))
    assert any_warmup[(1.0, "5%", "epochs", "grads-core-5pct")] == pytest.approx((-1.0, 0.0, 3))  # by seed only
    noisy = ev.paired_deltas(rows, ev.is_random, "noisy_share")[(0.1, "5%", "epochs", "grads-core-5pct")]
    assert noisy[0] == pytest.approx(-0.05)


def test_paired_deltas_skip_missing_metrics():
    rows = [_run(0, "random-5pct", "random", "", 0.1, 5.0, 10, 0.2),
            _run(0, "grads-all-5pct", "grads", "all", 0.1, 4.0, 10, 0.2)]
    rows[1]["after"]["meteor"] = 3.0  # random has none: nothing to pair
    assert ev.paired_deltas(rows, ev.is_random, "meteor") == {}
    rows[1]["after"]["chrf"] = math.nan
    assert ev.paired_deltas(rows, ev.is_random, "chrf") == {}


def test_ablation_tables():
    rows = []
    for seed in (0, 1):
        rows += [_run(seed, "random-5pct", "random", "", 0.1, 5.0, 10, 0.2),
                 _run(seed, "grads-core-5pct", "grads", "core", 0.1, 5.0 - 0.1 * seed, 10, 0.2),
                 _run(seed, "grads-core+dedup-5pct", "grads", "core+dedup", 0.1, 4.8, 10, 0.1),
                 _run(seed, "grads-core-5pct", "grads", "core", 1.0, 4.5, 10, 0.1),
                 _run(seed, "random-50pct", "random", "", 0.1, 4.0, 10, 0.2, budget="50%", view="steps"),
                 _run(seed, "grads-core-50pct", "grads", "core", 0.1, 3.9 + seed, 10, 0.2, budget="50%", view="steps")]
    t = ev.ablation_tables(rows)
    assert "| 10% | 5% | epochs | grads-core+dedup-5pct | 4.800 ± 0.000 |" in t["runs"]
    assert "| 100% | 5% | epochs | grads-core-5pct | 4.500 ± 0.000 |" in t["runs"]
    # core+dedup - core: -0.2 and -0.1 -> -0.150 ± 0.071; noisy -0.1 both seeds
    assert "| 10% | 5% | epochs | grads-core+dedup-5pct | -0.150 ± 0.071 |" in t["versus_core"]
    assert "-0.100 ± 0.000 |" in t["versus_core"].splitlines()[2]
    assert "random" not in t["versus_core"] and "50pct" not in t["versus_core"]  # the 50% core is the reference there
    assert "| 10% | 5% | epochs | grads-core-5pct | -0.050 ± 0.071 |" in t["versus_random"]
    assert "| 100% | 5% | epochs | grads-core-5pct | -0.500 ± 0.000 |" in t["versus_random"]
    assert "| 10% | 50% | steps | grads-core-50pct | +0.400 ± 0.707 |" in t["versus_random"]  # its own random
    assert ev.ablation_strategies("5", True)[0] == "random:5%"
    assert "grads:core+norm:5%" in ev.ablation_strategies("5", False)
    assert ev.ablation_strategies("50", False, larger=True)[:2] == ["random:50%", "grads:all:50%"]
    assert not any(s.startswith("random") for s in ev.ablation_strategies("5", False))


def test_default_scale_follows_flags_domain_and_device():
    assert ev.default_scale(True, "code", True) == "quick"
    assert ev.default_scale(False, "code", True) == "gpu"
    assert ev.default_scale(False, "code", False) == "code"
    assert ev.default_scale(False, "docs", False) == "cpu"
    assert ev.SCALES["code"]["code_rows"] > ev.SCALES["cpu"]["domain_rows"]  # the larger domain
    args = type("A", (), {"work": "/w", "domain": "code"})
    assert [ev.work_folder(args, s).name for s in ("code", "quick", "cpu")] == ["code", "quick-code", "cpu-code"]
    args.domain = "docs"
    assert ev.work_folder(args, "cpu").name == "cpu"
