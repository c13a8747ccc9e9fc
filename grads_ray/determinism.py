"""Same seed, same bits: torch's deterministic kernels around the passes that compute the job's
numbers (the scorer's and the training loops'). On a CPU that is measured (tests/test_determinism.py,
the demo twice); on a GPU it is what torch promises for these kernels, not yet measured here.

On a GPU several kernels add in whatever order their threads finish (atomic adds): the attention
backward (cuDNN's, flash, memory-efficient), ``index_add_``, ``scatter_add_``, ``index_select``'s
backward. So two passes over the same batch differ at rounding, and a statistic near zero (a
gradient's mean) by far more than that in relative terms: measured on an H200 (2026-12-04,
docs/benchmarks.md), 227 of the engine's columns and 279 of the plain step's gradients differed
between two passes, and the scores, hence the selection, of two runs with one seed would too.

``torch.use_deterministic_algorithms(True)`` (not ``warn_only``: with it the attention kernels keep
their non-deterministic backward and only warn, as measured) makes those kernels take their
deterministic algorithms, and makes an op that has none raise: :func:`explain` turns that error
into one line that names the way out (``deterministic=false``). Fresh memory is not filled with NaN
(``fill_uninitialized_memory``, a cost with no use here: every output is written). cuBLAS needs its
workspace fixed before its first call (``CUBLAS_WORKSPACE_CONFIG``): Ray's workers get it from the
run's environment (grads_ray/resources.py), an in-process caller from :func:`prepare`.

On a CPU the engine's kernels were deterministic already; the mode costs nothing measurable there
and makes a mixture of experts' plain training step deterministic too (its two passes differed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for reproducible results (its docs); 8 buffers of 4 MiB
NO_KERNEL = "does not have a deterministic implementation"


def prepare() -> None:
    """Fix cuBLAS's workspace for this process, where nothing set it (it must precede cuBLAS's first
    call to be used; torch checks it at each call in deterministic mode)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Deterministic kernels inside the block when ``enabled`` (else nothing changes); the process's
    settings as they were after it, so an in-process caller (a test, ``check-model``) keeps its own."""
    if not enabled:
        yield
        return
    import torch
    import torch.utils.deterministic as fill

    prepare()
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              fill.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    fill.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        fill.fill_uninitialized_memory = before[2]


def explain(exc: BaseException) -> str | None:
    """The one line for an op with no deterministic kernel on this device (torch's RuntimeError under
    :func:`deterministic`, or a Ray Train failure that carries its text), else None."""
    text = str(exc)
    if NO_KERNEL not in text:
        return None
    before = text.split(NO_KERNEL)[0].split()
    op = before[-1].rstrip(",") if before else "an operation"
    return (f"{op} has no deterministic kernel on this device: set deterministic=false to run this model "
            f"(its numbers then differ at rounding between runs)")
