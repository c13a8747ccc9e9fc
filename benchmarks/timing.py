"""What the benchmark scripts share: a wall-clock timer around one call."""

from __future__ import annotations

import time


def timed(fn, *args, **kwargs):
    """Call ``fn`` once. -> (its result, seconds of wall time)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
