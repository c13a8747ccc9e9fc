"""Named ranges of the engine's work for torch's profiler (``grads_ray.<part>``), so a device profile
can say how much GPU time each part takes (benchmarks/grad_stats.py, its profile section). A range
is opened only while a profiler records: outside one, :func:`part` costs one flag read."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.autograd import profiler

PREFIX = "grads_ray."


def part(name: str) -> AbstractContextManager:
    """A ``grads_ray.<name>`` profiler range while a profiler records, else nothing."""
    if getattr(profiler, "_is_profiler_enabled", True):
        return torch.profiler.record_function(PREFIX + name)
    return nullcontext()
