"""grads-ray compare's arithmetic and report, without Ray (the end-to-end run is in test_pipeline)."""

from __future__ import annotations

import math

import pytest

from grads_ray.compare import parse_strategy, report_markdown, summarize, write_plots
from grads_ray.config import ConfigError


def test_parse_strategy():
    assert parse_strategy("full") == ("full", "random", "100%")
    assert parse_strategy(" grads:5% ") == ("grads-5pct", "grads", "5%")
    assert parse_strategy("fisher:20000 tokens") == ("fisher-20000tokens", "fisher", "20000 tokens")
    for bad in ("grads", "grads:", ":5%", "5%"):
        with pytest.raises(ConfigError):
            parse_strategy(bad)


def _row(seed, strategy, method, share, dl, forget, bleu):
    return {"seed": seed, "strategy": strategy, "method": method, "budget": "x", "selected_share": share,
            "before": {"domain_loss": 8.0, "general_loss": 5.0}, "forgetting": forget,
            "after": {"domain_loss": dl, "general_loss": 5.0 * (1 + forget), "bleu": bleu, "chrf": 2 * bleu,
                      "rougeL": 3 * bleu}}


def test_summary_mean_and_sample_sd_over_seeds(tmp_path):
    rows = [_row(0, "grads-5pct", "grads", 0.05, 6.0, 0.01, 1.0), _row(1, "grads-5pct", "grads", 0.05, 6.2, 0.03, 3.0),
            _row(0, "random-5pct", "random", 0.05, 6.5, 0.02, 0.5), _row(1, "random-5pct", "random", 0.05, 6.7, 0.02, 0.5),
            _row(0, "full", "random", 1.0, 5.5, 0.10, 4.0), _row(1, "full", "random", 1.0, 5.5, 0.12, 4.0)]
    summary = summarize(rows)
    assert [s["strategy"] for s in summary] == ["grads-5pct", "random-5pct", "full"]
    g = summary[0]
    assert g["domain_loss_after"] == pytest.approx((6.1, math.sqrt(0.02)))  # sample sd of 6.0, 6.2
    assert g["bleu_after"] == pytest.approx((2.0, math.sqrt(2.0))) and g["seeds"] == 2
    assert g["forgetting"] == pytest.approx((0.02, math.sqrt(2e-4)))
    result = {"seeds": [0, 1], "summary": summary}
    plots = write_plots(result, tmp_path)
    for name in plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report_markdown(result, plots)
    assert "| grads-5pct | 5.0% | 8.0000 ± 0.0000 | 6.1000 ± 0.1414 | 0.0200 ± 0.0141 | 2.00 ± 1.41 |" in md
    assert "![domain_vs_budget.png](domain_vs_budget.png)" in md
