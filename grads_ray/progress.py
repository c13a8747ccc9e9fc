"""Progress of a stage: done / total, rate and ETA. A bar (tqdm) on a terminal; on anything else
(``ray job logs``, CI, a file) a log line at most every ``every`` seconds and at the end."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("grads_ray")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """``update(n)`` as work finishes. ``done`` may start above 0 (work a resumed run had finished);
    the rate counts only this run's work, from its first update on."""

    latest: dict[str, Progress] = {}  # the newest progress of each stage in this process

    def __init__(self, stage: str, total: int, unit: str = "rows", done: int = 0, every: float = 10.0,
                 tty: bool | None = None):
        self.stage, self.total, self.unit, self.every = stage, max(int(total), 0), unit, every
        Progress.latest[stage] = self  # what a stop reports (grads_ray/stopping.py)
        self.done, self.first_done, self.t_first = done, done, None
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=done, unit=f" {unit}", desc=f"[grads-ray] {stage}",
                            dynamic_ncols=True, leave=False)

    def line(self) -> str:
        """``stage: done of total unit (pct), rate/s, ETA``. The rate runs from the first update, so
        start-up time (Ray, model loading) does not skew the ETA; the first line has none."""
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        text = f"[grads-ray] {self.stage}: {self.done} of {self.total} {self.unit}{pct}"
        elapsed = time.time() - self.t_first if self.t_first is not None else 0.0
        if elapsed > 0 and self.done > self.first_done:
            rate = (self.done - self.first_done) / elapsed
            text += f", {rate:.1f} {self.unit}/s"
            if self.total > self.done:
                text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        if self.t_first is None:
            self.t_first, self.first_done = time.time(), self.done + n
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last >= self.every or self.done >= self.total:
            self.last = time.time()
            log.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
