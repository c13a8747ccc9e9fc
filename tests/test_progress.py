"""Progress lines: done / total, a rate from the first update on (start-up excluded), the ETA."""

from __future__ import annotations

import logging

from grads_ray import progress


def test_progress_lines_rate_and_eta(monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    bar = progress.Progress("score", 1000, "rows", done=200, every=10, tty=False)
    now[0] = 160.0  # a minute of start-up before the first shard comes back
    with caplog.at_level(logging.INFO, logger="grads_ray"):
        bar.update(100)
        assert bar.line() == "[grads-ray] score: 300 of 1000 rows (30%)"  # no rate yet
        now[0] = 170.0
        bar.update(200)  # 200 rows in 10 s since the first update
        assert bar.line() == "[grads-ray] score: 500 of 1000 rows (50%), 20.0 rows/s, ETA 25s"
        now[0] = 175.0
        bar.update(100)  # under `every` seconds since the last line: no new line
        now[0] = 320.0
        bar.update(400)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["[grads-ray] score: 300 of 1000 rows (30%)",
                     "[grads-ray] score: 500 of 1000 rows (50%), 20.0 rows/s, ETA 25s",
                     "[grads-ray] score: 1000 of 1000 rows (100%), 4.4 rows/s"]  # 700 rows in 160 s
    assert progress._duration(3725) == "1h02m" and progress._duration(95) == "1m35s"
