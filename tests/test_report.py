"""The selection report: counts that match the verdicts, the plot, the removed near-duplicates."""

from __future__ import annotations

import numpy as np

from grads_ray.evaluation.report import write_report


def test_report_counts_plots_and_duplicates(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    cols = {"loss": rng.gamma(2, 1, n), "grad_norm": rng.lognormal(0, 1, n), "head.grad_norm": rng.lognormal(0, 1, n)}
    cols["grad_norm"][5] = np.nan  # a non-finite row must not break the plot
    selected = np.zeros(n, bool)
    selected[:20] = True
    reason = np.array([""] * 20 + ["duplicate"] * 7 + ["outside_band"] * 100 + ["over_budget"] * 73, dtype=object)
    groups = np.arange(n)
    groups[20:27] = [0, 0, 1, 1, 2, 3, 150]  # 150: a group none of whose members was selected
    ids = [f"r{i}" for i in range(n)]
    manifest = {"accounting": {"input_rows": 210, "scored": 200, "rejected_ingest": 10, "rejected_score": 0},
                "rejected_by_reason": {"bad_json": 10}, "stages": {"select": {"method": "grads", "budget": "10%"}}}
    path = write_report(tmp_path / "selection_report.md", cols, ids, selected, reason, groups, manifest)
    text = path.read_text()
    assert "- selected: 20 of 200 by grads, budget 10%" in text
    assert "not selected, outside_band: 100" in text and "not selected, duplicate: 7" in text
    assert "bad_json: 10" in text
    assert "| `r20` | `r0` |" in text and "| `r26` | `(none selected)` |" in text
    assert "7 examples, in 5 groups" in text
    assert (tmp_path / "selection_report" / "distributions.png").stat().st_size > 10_000
    assert "| head.grad_norm |" in text
